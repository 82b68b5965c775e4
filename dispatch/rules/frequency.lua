-- Frequency cap, one file for both users (the send path and the planner):
--
-- reserve (send time), for one (address hash, channel) key:
--   KEYS[1]: sorted set of sends (score: send time in ms, member: message token)
--   ARGV[1]: now (ms)  ARGV[2]: window (ms)  ARGV[3]: limit  ARGV[4]: token
--   Returns 1 when the send is allowed and recorded (or was already recorded under this token:
--   idempotent for redelivered messages), 0 when the cap is reached.
--
-- count (plan time, read-only), for many keys in one call:
--   ARGV[1]: 'count'  ARGV[2]: window start (ms, exclusive)  ARGV[3]: limit
--   Returns a string with one character per key: '1' when the key holds >= limit sends after
--   the window start, else '0'.
if ARGV[1] == 'count' then
  local low = '(' .. ARGV[2]
  local limit = tonumber(ARGV[3])
  local out = {}
  for i, key in ipairs(KEYS) do
    out[i] = (redis.call('ZCOUNT', key, low, '+inf') >= limit) and '1' or '0'
  end
  return table.concat(out)
end
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
