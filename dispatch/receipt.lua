-- Apply a provider delivery receipt to a message record, tolerating duplicates and reordering.
-- KEYS[1] records hash, KEYS[2] counters hash
-- ARGV[1] index, ARGV[2] final state (delivered | failed | bounced), ARGV[3] code, ARGV[4] now
-- A receipt 'failed' (sent but not delivered) is counted as 'undelivered', apart from sends the
-- provider refused outright ('failed').
-- Returns 1 applied, 2 deferred (the send is not confirmed yet: applied at confirmation),
-- 0 ignored (already final: a duplicate or late receipt), -1 unknown message.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then
  return -1
end
local st, att, owner, pid = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|')
if st == 'sending' then
  redis.call('HSET', KEYS[1], 'r' .. ARGV[1], ARGV[2] .. '|' .. ARGV[3])
  return 2
end
if st ~= 'sent' then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. att .. '||' .. pid .. '|' .. ARGV[3] .. '|' .. ARGV[4])
local counter = ARGV[2]
if counter == 'failed' then counter = 'undelivered' end
redis.call('HINCRBY', KEYS[2], counter, 1)
return 1
