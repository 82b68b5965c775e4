-- Put a campaign's dead-lettered messages back to 'retry' (dispatch retry-failed), atomically.
-- KEYS[1] dead-letter set, KEYS[2] counters hash
-- ARGV[1] records key prefix (the batch number is appended), ARGV[2] now
-- Returns the batch numbers that now hold retryable messages, then the message count last.
local members = redis.call('SMEMBERS', KEYS[1])
local batches = {}
local count = 0
for _, member in ipairs(members) do
  local b, idx = string.match(member, '^(%d+):(%d+)$')
  if b then
    local key = ARGV[1] .. b
    local rec = redis.call('HGET', key, idx)
    if rec and string.sub(rec, 1, 7) == 'failed|' then
      local code = string.match(rec, '^[^|]*|[^|]*|[^|]*|[^|]*|([^|]*)')
      redis.call('HSET', key, idx, 'retry|0||||' .. ARGV[2])
      redis.call('HINCRBY', KEYS[2], 'failed', -1)
      redis.call('HINCRBY', KEYS[2], 'dead_letters', -1)
      if code == 'in_doubt' then
        -- an operator decided to send a message held in doubt again
        redis.call('HINCRBY', KEYS[2], 'in_doubt', -1)
      end
      batches[b] = true
      count = count + 1
    end
  end
  redis.call('SREM', KEYS[1], member)
end
local out = {}
for b, _ in pairs(batches) do
  out[#out + 1] = tonumber(b)
end
out[#out + 1] = count
return out
