-- Claim a batch's messages for one batch-channel run (dedup step), atomically, with one *group
-- record* standing for every message that has no record of its own.
-- KEYS[1] message records hash of the batch, KEYS[2] campaign control hash
-- ARGV[1] owner (worker id), ARGV[2] now (unix s), ARGV[3] liveness key prefix,
-- ARGV[4] records TTL (s), ARGV[5] number of messages in the batch, ARGV[6] this run
-- ('<campaign>|<batch>')
-- Own record (field = index): state|attempts|owner|provider_id|code|ts (as claim.lua).
-- Group record (field 'g'): state|attempts|owner|provider_id_prefix|code|ts|first|last|members
--   its members are the indices first..last that have no record of their own; 'members' counts
--   them (finish_group.lua keeps it true when a member gets a record of its own).
-- Returns {-1} when the campaign is not running, {-2} when a live other owner holds the batch's
-- lease (field 'L', as claim.lua), else
--   {group code, group attempts, first, last, members, group ts, then index, code, attempts, ts
--    for every index that is not a group member}
-- with the codes of claim.lua (0 done, 1 claimable, 2 in doubt: issued by a run that is gone,
-- 3 busy); ts is when an in-doubt record was issued ('' otherwise). A batch without a group
-- answers first 0, last -1. Nothing is marked 'sending' here (issue.lua does, per request): a new
-- group record is written 'retry' (claimable) held by this owner; an in-doubt record is re-owned
-- with its state and ts kept.
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'running' then
  return {-1}
end
-- A lease is 'owner|since'; it is live while its owner is alive and either took it less than
-- LEASE_FRESH_S ago or says (its heartbeat's set of runs) that it is sending this batch: a live
-- worker's lease on a batch it no longer sends (a run whose release a Redis restart lost) is stale.
local function lease_live(lease, owner, alive, member, now)
  if not lease then return false end
  local holder, since = string.match(lease, '^([^|]*)|?([^|]*)$')
  if holder == owner or redis.call('EXISTS', alive .. holder) == 0 then return false end
  if tonumber(since) and tonumber(now) - tonumber(since) < 5 then return true end
  return redis.call('SISMEMBER', alive .. holder .. ':runs', member) == 1
end
local owner, now, alive = ARGV[1], ARGV[2], ARGV[3]
if lease_live(redis.call('HGET', KEYS[1], 'L'), owner, alive, ARGV[6], now) then
  return {-2}
end
redis.call('HSET', KEYS[1], 'L', owner .. '|' .. now)
local count = tonumber(ARGV[5])
local flat = redis.call('HGETALL', KEYS[1])
local own = {}
local group
for i = 1, #flat, 2 do
  local field = flat[i]
  if field == 'g' then
    group = flat[i + 1]
  elseif field == 'L' then
    -- the lease, not a message
  elseif string.find(field, '^%d+$') then
    own[tonumber(field)] = flat[i + 1]
  end
end

local function holder_code(st, holder)
  if st == 'sending' then
    -- a request is on the wire only while its run holds the lease, and this run holds it now:
    -- whoever issued it no longer has it in flight, so it is in doubt
    return 2
  elseif st == 'retry' then
    return 1
  end
  return 0
end

local out = {0, 0, 0, -1, 0, ''}
local first, last = 0, -1
if group then
  local st, att, holder, pid, code, ts, f, l, n =
    string.match(group, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  first, last = tonumber(f), tonumber(l)
  local gcode = holder_code(st, holder)
  local gts = ''
  if gcode == 1 then
    redis.call('HSET', KEYS[1], 'g', table.concat({'retry', att, owner, pid, code, ts, f, l, n}, '|'))
  elseif gcode == 2 then
    gts = ts
    redis.call('HSET', KEYS[1], 'g', table.concat({st, att, owner, pid, code, ts, f, l, n}, '|'))
  end
  out = {gcode, tonumber(att) or 0, first, last, tonumber(n), gts}
else
  local members = count
  for idx, _ in pairs(own) do
    if idx < count then members = members - 1 end
  end
  if members > 0 then
    first, last = 0, count - 1
    redis.call('HSET', KEYS[1], 'g', 'retry|0|' .. owner .. '|||' .. now .. '|0|' .. last .. '|' .. members)
    out = {1, 0, first, last, members, ''}
  end
end

-- every index that is not a group member: its own record, or a fresh per-index claim
for idx = 0, count - 1 do
  local rec = own[idx]
  if rec or idx < first or idx > last then
    local code, attempts, its = 1, 0, ''
    if rec then
      local st, att, holder, pid, rcode, ts, provider =
        string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|?([^|]*)$')
      attempts = tonumber(att) or 0
      code = holder_code(st, holder)
      if code == 2 then
        its = ts
        redis.call('HSET', KEYS[1], idx, table.concat({st, att, owner, pid, rcode, ts, provider or ''}, '|'))
      end
    end
    out[#out + 1] = idx
    out[#out + 1] = code
    out[#out + 1] = attempts
    out[#out + 1] = its
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return out
