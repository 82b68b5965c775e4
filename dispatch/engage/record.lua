-- Record one engagement event of one message, once (the first occurrence wins).
-- KEYS[1] the batch's engagement hash, KEYS[2] the campaign's engagement counters,
-- KEYS[3] the campaign's manifest (an event of an unknown campaign is refused)
-- ARGV[1] message index, ARGV[2] event name, ARGV[3] time (epoch ms), ARGV[4] TTL (s)
-- Returns 1 recorded (first time), 0 already recorded (a duplicate), -1 unknown campaign.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return -1
end
local field = ARGV[1] .. '.' .. ARGV[2]
if redis.call('HSETNX', KEYS[1], field, ARGV[3]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
