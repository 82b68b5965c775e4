-- Claim a batch's messages for sending (dedup step), atomically.
-- KEYS[1] message records hash of the batch, KEYS[2] campaign control hash
-- ARGV[1] owner (worker id), ARGV[2] now (unix s), ARGV[3] liveness key prefix,
-- ARGV[4] records TTL (s), ARGV[5..] message indices
-- Record format: state|attempts|owner|provider_id|code|ts
-- Returns {-1} when the campaign is not running, else per index two numbers:
--   code (0 done: terminal, skip; 1 claimed; 2 reclaimed from a dead owner: may have been sent;
--   3 busy: a live worker holds it) and attempts made so far.
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'running' then
  return {-1}
end
local out = {}
for i = 5, #ARGV do
  local idx = ARGV[i]
  local rec = redis.call('HGET', KEYS[1], idx)
  local code, attempts = 1, 0
  if rec then
    local st, att, owner = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|')
    attempts = tonumber(att) or 0
    if st == 'sending' then
      -- our own process holds no run of this batch (the engine checks), so our own stale claim
      -- is as orphaned as a dead worker's
      if owner ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. owner) == 1 then code = 3 else code = 2 end
    elseif st == 'retry' then
      code = 1
    else
      code = 0
    end
  end
  if code == 1 or code == 2 then
    redis.call('HSET', KEYS[1], idx, 'sending|' .. attempts .. '|' .. ARGV[1] .. '|||' .. ARGV[2])
  end
  out[#out + 1] = code
  out[#out + 1] = attempts
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return out
