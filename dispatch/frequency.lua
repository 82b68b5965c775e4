-- Frequency cap reservation for one (address hash, channel) key.
-- KEYS[1]: sorted set of sends (score: send time in ms, member: message token)
-- ARGV[1]: now (ms)  ARGV[2]: window (ms)  ARGV[3]: limit  ARGV[4]: token
-- Returns 1 when the send is allowed and recorded (or was already recorded under this token:
-- idempotent for redelivered messages), 0 when the cap is reached.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 1
