-- Claim a batch's messages for one batch-channel run (dedup step), atomically, with one *group
-- record* standing for every message that has no record of its own.
-- KEYS[1] message records hash of the batch, KEYS[2] campaign control hash
-- ARGV[1] owner (worker id), ARGV[2] now (unix s), ARGV[3] liveness key prefix,
-- ARGV[4] records TTL (s), ARGV[5] number of messages in the batch
-- Own record (field = index): state|attempts|owner|provider_id|code|ts (as claim.lua).
-- Group record (field 'g'): state|attempts|owner|provider_id_prefix|code|ts|first|last|members
--   its members are the indices first..last that have no record of their own; 'members' counts
--   them (finish_group.lua keeps it true when a member gets a record of its own).
-- Returns {-1} when the campaign is not running, else
--   {group code, group attempts, first, last, members, then index, code, attempts for every
--    index that is not a group member}
-- with the codes of claim.lua (0 done, 1 claimed, 2 reclaimed from a dead owner, 3 busy); a batch
-- without a group answers first 0, last -1.
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'running' then
  return {-1}
end
local owner, now, alive = ARGV[1], ARGV[2], ARGV[3]
local count = tonumber(ARGV[5])
local flat = redis.call('HGETALL', KEYS[1])
local own = {}
local group
for i = 1, #flat, 2 do
  local field = flat[i]
  if field == 'g' then
    group = flat[i + 1]
  elseif string.find(field, '^%d+$') then
    own[tonumber(field)] = flat[i + 1]
  end
end

local function holder_code(st, holder)
  if st == 'sending' then
    -- our own process holds no run of this batch (the engine checks), so our own stale claim
    -- is as orphaned as a dead worker's
    if holder ~= owner and redis.call('EXISTS', alive .. holder) == 1 then return 3 end
    return 2
  elseif st == 'retry' then
    return 1
  end
  return 0
end

local out = {0, 0, 0, -1, 0}
local first, last = 0, -1
if group then
  local st, att, holder, pid, code, ts, f, l, n =
    string.match(group, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  first, last = tonumber(f), tonumber(l)
  local gcode = holder_code(st, holder)
  if gcode == 1 or gcode == 2 then
    redis.call('HSET', KEYS[1], 'g', 'sending|' .. att .. '|' .. owner .. '|||' .. now .. '|' .. f .. '|' .. l .. '|' .. n)
  end
  out = {gcode, tonumber(att) or 0, first, last, tonumber(n)}
else
  local members = count
  for idx, _ in pairs(own) do
    if idx < count then members = members - 1 end
  end
  if members > 0 then
    first, last = 0, count - 1
    redis.call('HSET', KEYS[1], 'g', 'sending|0|' .. owner .. '|||' .. now .. '|0|' .. last .. '|' .. members)
    out = {1, 0, first, last, members}
  end
end

-- every index that is not a group member: its own record, or a fresh per-index claim
for idx = 0, count - 1 do
  local rec = own[idx]
  if rec or idx < first or idx > last then
    local code, attempts = 1, 0
    if rec then
      local st, att, holder = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|')
      attempts = tonumber(att) or 0
      code = holder_code(st, holder)
    end
    if code == 1 or code == 2 then
      redis.call('HSET', KEYS[1], idx, 'sending|' .. attempts .. '|' .. owner .. '|||' .. now)
    end
    out[#out + 1] = idx
    out[#out + 1] = code
    out[#out + 1] = attempts
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return out
