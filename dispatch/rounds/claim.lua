-- Claim the start of a funnel round (dispatch.rounds.scheduler), atomically across processes.
-- KEYS[1] the round's state hash; ARGV[1] owner, ARGV[2] now (the scheduler's clock, epoch s),
-- ARGV[3] lease seconds.
-- Returns 1 claimed (by this owner: a new claim, or one whose holder's lease ran out),
-- 0 the round is already done (started, or settled as empty), -1 another owner holds a live lease.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'started' or state == 'empty' then
  return 0
end
local now = tonumber(ARGV[2])
if state == 'claimed' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if owner ~= ARGV[1] and lease > now then
    return -1
  end
end
redis.call('HSET', KEYS[1], 'state', 'claimed', 'owner', ARGV[1], 'lease_until', tostring(now + tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'claims', 1)
return 1
