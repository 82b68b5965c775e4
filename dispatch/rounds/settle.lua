-- Settle a funnel round claimed by this owner: state 'started' or 'empty' (dispatch.rounds.scheduler).
-- KEYS[1] the round's state hash; ARGV[1] owner, ARGV[2] final state, ARGV[3] now.
-- Returns 1 settled, 0 already settled, -1 the claim is another owner's now (our lease ran out).
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'started' or state == 'empty' then
  return 0
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return -1
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'settled_at', ARGV[3])
return 1
