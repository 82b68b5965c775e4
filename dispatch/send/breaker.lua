-- Circuit breaker of one provider, shared by every worker (dispatch.send.health).
-- KEYS[1]: the provider's health hash. Fields: state (closed|open|half_open), opened_at,
-- retry_at (when a probe may go), open_s (the current open period), win_start, ok, bad, reason.
-- ARGV[1] = 'admit': ARGV[2] now, ARGV[3] probe lease (s).
--   -> {verdict, opened_at, retry_at, reason}; verdict: 'closed' (send), 'probe' (send: you are
--      the one probe of a half-open breaker) or 'wait' (do not send before retry_at).
-- ARGV[1] = 'record': ARGV[2] now, ARGV[3] ok, ARGV[4] bad, ARGV[5] window_s, ARGV[6] min_bad,
--   ARGV[7] ratio, ARGV[8] open_s, ARGV[9] max_open_s, ARGV[10] reason, ARGV[11] ttl_s.
--   -> {state, opened_at, retry_at, transition}; transition: '' | 'opened' | 'closed' | 'reopened'.
local key = KEYS[1]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local h = redis.call('HMGET', key, 'state', 'opened_at', 'retry_at', 'open_s', 'win_start', 'ok', 'bad', 'reason')
local state = h[1] or 'closed'
local opened_at = h[2] or '0'
local retry_at = tonumber(h[3]) or 0
local reason = h[8] or ''

if op == 'admit' then
  if state == 'closed' then
    return {'closed', '0', '0', ''}
  end
  if now < retry_at then
    return {'wait', opened_at, tostring(retry_at), reason}
  end
  -- the open period (or the last probe's lease) is over: this caller probes
  local lease = tonumber(ARGV[3])
  redis.call('HSET', key, 'state', 'half_open', 'retry_at', tostring(now + lease))
  return {'probe', opened_at, tostring(now + lease), reason}
end

local ok, bad = tonumber(ARGV[3]), tonumber(ARGV[4])
local window_s, min_bad, ratio = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local base_open, max_open, ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[11])
local transition = ''
if state == 'half_open' then
  if ok > 0 then
    redis.call('HSET', key, 'state', 'closed', 'win_start', tostring(now), 'ok', 0, 'bad', 0, 'open_s', tostring(base_open),
      'retry_at', '0', 'reason', '')
    state, transition, retry_at = 'closed', 'closed', 0
  elseif bad > 0 then
    local open_s = math.min(max_open, (tonumber(h[4]) or base_open) * 2)
    retry_at = now + open_s
    redis.call('HSET', key, 'state', 'open', 'retry_at', tostring(retry_at), 'open_s', tostring(open_s))
    state, transition = 'open', 'reopened'
  end
elseif state == 'closed' then
  local win_start = tonumber(h[5]) or 0
  local seen_ok, seen_bad = tonumber(h[6]) or 0, tonumber(h[7]) or 0
  if now - win_start >= window_s then
    win_start, seen_ok, seen_bad = now, 0, 0
  end
  seen_ok, seen_bad = seen_ok + ok, seen_bad + bad
  if seen_bad >= min_bad and seen_bad >= ratio * (seen_ok + seen_bad) then
    retry_at = now + base_open
    opened_at = tostring(now)
    redis.call('HSET', key, 'state', 'open', 'opened_at', opened_at, 'retry_at', tostring(retry_at),
      'open_s', tostring(base_open), 'win_start', tostring(now), 'ok', 0, 'bad', 0, 'reason', ARGV[10])
    state, transition = 'open', 'opened'
  else
    redis.call('HSET', key, 'win_start', tostring(win_start), 'ok', seen_ok, 'bad', seen_bad)
  end
end
-- answers to requests made before the breaker opened change nothing while it is open
redis.call('EXPIRE', key, ttl)
return {state, opened_at, tostring(retry_at), transition}
