-- GCRA with an adaptive (AIMD) rate over several keys at once, on Redis server time only.
--
-- KEYS: one hash per limit key. A key whose hash has no `rate` field is unlimited (skipped).
-- Hash fields: rate burst backoff recovery floor cooldown   the configuration
--              tat   theoretical arrival time (seconds since EPOCH, server clock)
--              effl  effective rate at which tat was last anchored. When the effective rate
--                    changes, tat is re-anchored at that moment so the bucket's fill level in
--                    tokens is kept: tat = now + (tat - now) * effl / eff
--              eff0, t0  effective rate right after the last penalty and when it happened;
--                    the rate recovers lazily: min(rate, eff0 + recovery * rate * (now - t0))
--
-- ARGV[1] is the operation:
--   "acquire" cost1 count1 cost2 count2 ...  a FIFO queue of acquisitions, run-length encoded.
--       Grants the longest prefix that fits on every limited key, consuming from all of them or
--       from none. Returns {granted_count, wait, headroom, too_large_key, too_large_burst}:
--       wait = seconds until the first refused acquisition would fit, headroom = min over the
--       limited keys of burst / effective rate ("inf" when none), too_large_* set when that
--       acquisition's cost exceeds a burst. A refusal takes no tokens (it may re-anchor tat).
--   "configure" rate burst backoff recovery floor cooldown   (KEYS[1]) create or re-rate,
--       keeping the fill level and any penalty in force.
--   "penalize" retry_after   (KEYS[1]; retry_after <= 0 means none) -> new effective rate
--   "rate"                   -> the effective rate of each key ("" when unlimited)

-- Redis < 5 replicates scripts verbatim, which forbids writes after TIME; newer servers
-- replicate effects and treat this call as a no-op.
if redis.replicate_commands ~= nil then
  redis.replicate_commands()
end

-- Times are kept relative to this epoch so doubles keep sub-microsecond precision.
local EPOCH = 1600000000
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - EPOCH) + tonumber(clock[2]) / 1000000
-- Absorbs float rounding when counting whole tokens.
local EPS = 1e-9

local function fmt(x)
  return string.format('%.17g', x)
end

local CONFIG = {'rate', 'burst', 'backoff', 'recovery', 'floor', 'cooldown'}

-- The effective rate now, from the configuration and the penalty state.
local function effective(s)
  if s.eff0 == nil or s.t0 == nil then
    return s.rate
  end
  local start = math.max(s.eff0, s.floor * s.rate)
  return math.min(s.rate, start + s.recovery * s.rate * math.max(0, now - s.t0))
end

-- Moves tat so the fill level in tokens at `now` is kept when the rate becomes `eff`.
local function anchor(s, eff)
  if s.tat <= now then
    s.tat = now
  elseif s.eff ~= eff then
    s.tat = now + (s.tat - now) * s.eff / eff
    s.dirty = true
  end
  s.eff = eff
end

local function load(key)
  local v = redis.call('HMGET', key, 'rate', 'burst', 'backoff', 'recovery', 'floor', 'cooldown',
    'tat', 'effl', 'eff0', 't0')
  local rate = tonumber(v[1])
  if rate == nil then
    return nil
  end
  local s = {
    key = key, rate = rate, burst = tonumber(v[2]), backoff = tonumber(v[3]),
    recovery = tonumber(v[4]), floor = tonumber(v[5]), cooldown = tonumber(v[6]),
    tat = tonumber(v[7]) or now, eff0 = tonumber(v[9]), t0 = tonumber(v[10]), dirty = false,
  }
  s.eff = tonumber(v[8]) or rate
  anchor(s, effective(s))
  return s
end

local function save(s)
  if s.eff0 ~= nil and s.eff >= s.rate then
    redis.call('HDEL', s.key, 'eff0', 't0')
    s.eff0 = nil
  end
  if s.eff0 ~= nil then
    redis.call('HSET', s.key, 'tat', fmt(s.tat), 'effl', fmt(s.eff), 'eff0', fmt(s.eff0), 't0', fmt(s.t0))
  else
    redis.call('HSET', s.key, 'tat', fmt(s.tat), 'effl', fmt(s.eff))
  end
end

local op = ARGV[1]

if op == 'acquire' then
  local states = {}
  local avail = math.huge
  local headroom = math.huge
  for _, key in ipairs(KEYS) do
    local s = load(key)
    if s ~= nil then
      states[#states + 1] = s
      avail = math.min(avail, s.burst - (s.tat - now) * s.eff)
      headroom = math.min(headroom, s.burst / s.eff)
    end
  end
  local granted, tokens, refused_cost = 0, 0, nil
  for i = 2, #ARGV, 2 do
    local cost, count = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    local fit = count
    if avail ~= math.huge then
      fit = math.max(0, math.min(count, math.floor((avail - tokens) / cost + EPS)))
    end
    granted = granted + fit
    tokens = tokens + fit * cost
    if fit < count then
      refused_cost = cost
      break
    end
  end
  for _, s in ipairs(states) do
    if tokens > 0 then
      s.tat = s.tat + tokens / s.eff
      save(s)
    elseif s.dirty then
      save(s)
    end
  end
  local wait, big_key, big_burst = 0, '', ''
  if refused_cost ~= nil then
    for _, s in ipairs(states) do
      wait = math.max(wait, (s.tat - now) - (s.burst - refused_cost) / s.eff)
      if refused_cost > s.burst and big_key == '' then
        big_key, big_burst = s.key, tostring(s.burst)
      end
    end
  end
  local room = 'inf'
  if headroom ~= math.huge then
    room = fmt(headroom)
  end
  return {tostring(granted), fmt(wait), room, big_key, big_burst}
elseif op == 'penalize' then
  local s = load(KEYS[1])
  if s == nil then
    return ''
  end
  local retry_after = tonumber(ARGV[2])
  if s.eff0 == nil or s.t0 == nil or now - s.t0 >= s.cooldown then
    local lowered = math.max(s.floor * s.rate, s.eff * s.backoff)
    anchor(s, lowered)
    s.eff0, s.t0 = lowered, now
  end
  if retry_after > 0 then
    -- Nothing fits before now + retry_after, then one token, then the effective rate.
    s.tat = math.max(s.tat, now + retry_after + (s.burst - 1) / s.eff)
  end
  save(s)
  return fmt(s.eff)
elseif op == 'configure' then
  local key = KEYS[1]
  local s = load(key)
  local fields = {}
  for i, name in ipairs(CONFIG) do
    fields[#fields + 1] = name
    fields[#fields + 1] = ARGV[i + 1]
  end
  redis.call('HSET', key, unpack(fields))
  if s ~= nil then
    s.rate, s.burst, s.floor, s.recovery = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6]),
      tonumber(ARGV[5])
    anchor(s, effective(s))
    save(s)
  end
  return 'OK'
elseif op == 'rate' then
  local out = {}
  for i, key in ipairs(KEYS) do
    local s = load(key)
    if s == nil then
      out[i] = ''
    else
      out[i] = fmt(s.eff)
    end
  end
  return out
end
return redis.error_reply('gcra.lua: unknown operation ' .. tostring(op))
