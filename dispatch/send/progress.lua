-- Keep a small ring of a campaign's progress samples (the live rate of `dispatch status`), atomically.
-- KEYS[1] the ring (a list of 'time:count', newest first), KEYS[2] the campaign's manifest (the
-- ring expires with it)
-- ARGV[1] now (unix s), ARGV[2] messages with a final outcome, ARGV[3] least seconds between two
-- samples (many readers and workers call this: the ring must span time, not calls),
-- ARGV[4] most samples kept
-- Returns the ring, newest first, after the sample (if due) was added.
local now = tonumber(ARGV[1])
local head = redis.call('LINDEX', KEYS[1], 0)
local due = true
if head then
  local t = tonumber(string.match(head, '^([^:]*):'))
  if t and now - t < tonumber(ARGV[3]) and now >= t then
    due = false
  end
end
if due then
  redis.call('LPUSH', KEYS[1], ARGV[1] .. ':' .. ARGV[2])
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[4]) - 1)
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  else
    redis.call('PERSIST', KEYS[1])
  end
end
return redis.call('LRANGE', KEYS[1], 0, -1)
