-- Apply a provider delivery receipt to a message record, tolerating duplicates and reordering.
-- KEYS[1] records hash, KEYS[2] counters hash, KEYS[3] the campaign's manifest
-- ARGV[1] index, ARGV[2] final state (delivered | failed | bounced), ARGV[3] code, ARGV[4] now,
-- ARGV[5] the message's ref (a group member's provider id is the group's prefix .. ref),
-- ARGV[6] the channel the receipt's provider sends (a receipt never touches another channel's
-- message: a Twilio callback cannot mark an email failed)
-- A message without a record of its own is a member of the batch's group record ('g', see
-- claim_group.lua) when its index is in the group's range: the group's state is its state, and
-- a receipt gives it a record of its own.
-- A receipt 'failed' (sent but not delivered) is counted as 'undelivered', apart from sends the
-- provider refused outright ('failed').
-- Returns 1 applied, 2 deferred (the send is not confirmed yet: applied at confirmation),
-- 0 ignored (already final: a duplicate or late receipt), -1 unknown message, -2 a message of
-- another channel (nothing changes).
local manifest = redis.call('GET', KEYS[3])
if not manifest then
  return -1
end
local ok, decoded = pcall(cjson.decode, manifest)
if not ok or type(decoded) ~= 'table' or decoded['channel'] ~= ARGV[6] then
  return -2
end
local rec = redis.call('HGET', KEYS[1], ARGV[1])
local st, att, pid
if rec then
  st, att, pid = string.match(rec, '^([^|]*)|([^|]*)|[^|]*|([^|]*)|')
else
  local group = redis.call('HGET', KEYS[1], 'g')
  if not group then
    return -1
  end
  local gst, gatt, prefix, first, last =
    string.match(group, '^([^|]*)|([^|]*)|[^|]*|([^|]*)|[^|]*|[^|]*|([^|]*)|([^|]*)|')
  local n = tonumber(ARGV[1])
  if n == nil or n < tonumber(first) or n > tonumber(last) then
    return -1
  end
  st, att, pid = gst, gatt, ''
  if prefix ~= '' then pid = prefix .. ARGV[5] end
  if st == 'sending' then
    if redis.call('HSET', KEYS[1], 'r' .. ARGV[1], ARGV[2] .. '|' .. ARGV[3]) == 1 then
      redis.call('HINCRBY', KEYS[1], 'rn', 1)
    end
    return 2
  end
end
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
