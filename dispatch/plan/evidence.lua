-- Fold one window of send measurements into a channel's and provider's running statistics.
-- KEYS[1] the statistics hash, KEYS[2] the sorted set of workers that published (id -> time)
-- ARGV[1] now (unix s), ARGV[2] weight of the newest sample (0..1), ARGV[3] worker id,
-- ARGV[4] seconds a worker counts as live after its last sample, ARGV[5] seconds the hash is kept,
-- ARGV[6..] name, value pairs
-- Per name the hash holds '<name>:mean', '<name>:var' (exponentially weighted, West 1979; a plain
-- running mean and variance over the first 1/ARGV[2] windows) and
-- '<name>:n'; the hash has a fixed set of fields, so its size is bounded.
-- The number of live workers is folded in as 'workers'. Returns that number.
local now = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
local workers = redis.call('ZCARD', KEYS[2])
local pairs_ = {}
for i = 6, #ARGV, 2 do
  pairs_[#pairs_ + 1] = {ARGV[i], tonumber(ARGV[i + 1])}
end
pairs_[#pairs_ + 1] = {'workers', workers}
for _, pair in ipairs(pairs_) do
  local name = pair[1]
  local x = pair[2]
  local n = tonumber(redis.call('HGET', KEYS[1], name .. ':n') or '0')
  local mean, var
  if n == 0 then
    mean, var = x, 0
  else
    mean = tonumber(redis.call('HGET', KEYS[1], name .. ':mean'))
    var = tonumber(redis.call('HGET', KEYS[1], name .. ':var'))
    -- the first windows are averaged plainly (weight 1/(n+1)): an exponential average started at
    -- its first value would hold on to that one (often a send's start) for dozens of windows
    local wn = math.max(w, 1 / (n + 1))
    local d = x - mean
    mean = mean + wn * d
    var = (1 - wn) * (var + wn * d * d)
  end
  redis.call('HSET', KEYS[1], name .. ':mean', tostring(mean), name .. ':var', tostring(var), name .. ':n', n + 1)
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return workers
