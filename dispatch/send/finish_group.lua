-- Record outcomes of claimed messages and count them, atomically (track step): a per-message
-- channel's outcomes (no group: ARGV[5] = ''), or one batch-channel run.
-- KEYS[1] records hash, KEYS[2] campaign counters hash, KEYS[3] dead-letter set
-- ARGV[1] owner, ARGV[2] now, ARGV[3] batch number, ARGV[4] retries made (counter delta),
-- ARGV[5] group state ('' = the group keeps its claim), ARGV[6] group attempts,
-- ARGV[7] group provider id prefix (a member's id is prefix .. its ref; '' = none),
-- ARGV[8] group code, ARGV[9] ref prefix ('<campaign>.<batch>.': a member's ref is it .. index),
-- then groups of 5 for messages with an outcome of their own: index, state, attempts,
-- provider_id, code. A state is one of sent, failed, suppressed, skipped, retry (claimable
-- again), dead (failed and dead-lettered), doubt (still in doubt: a 'sending' record issued at
-- the time given as its code; not counted).
-- Own outcomes go first: a group member that gets one leaves the group (members - 1). Then the
-- group's state covers its remaining members and its counter moves by their number. Only
-- messages this run may decide change: its own 'sending' records (issued by it), 'retry' records,
-- and messages never issued (no record, not a member of someone else's group: the run holds the
-- batch's lease); a run taken over by another worker is never counted twice.
-- A record keeps the provider its request went to (field 7) when it had one.
-- Group states: sent, retry, failed, suppressed, skipped ('dead' is always an own outcome: each
-- dead letter is a member of the dead-letter set).
-- Returns the number of messages whose outcome was applied.
local owner, now = ARGV[1], ARGV[2]
local applied = 0
local retries = tonumber(ARGV[4])
if retries > 0 then
  redis.call('HINCRBY', KEYS[2], 'retries', retries)
end
local group = redis.call('HGET', KEYS[1], 'g')
local gst, gatt, gholder, gpid, gcode, gts, first, last, members
local mine = false
if group then
  gst, gatt, gholder, gpid, gcode, gts, first, last, members =
    string.match(group, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  first, last, members = tonumber(first), tonumber(last), tonumber(members)
  mine = (gst == 'sending' or gst == 'retry') and gholder == owner
end
local early = tonumber(redis.call('HGET', KEYS[1], 'rn') or '0')

for i = 10, #ARGV, 5 do
  local idx, st, att, pid, code = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local rec = redis.call('HGET', KEYS[1], idx)
  local claimed, member, provider = false, false, ''
  if rec then
    local cur, holder, prov = string.match(rec, '^([^|]*)|[^|]*|([^|]*)|[^|]*|[^|]*|[^|]*|?([^|]*)$')
    claimed = (cur == 'sending' and holder == owner) or cur == 'retry'
    provider = prov or ''
  else
    local n = tonumber(idx)
    local covered = group and n >= first and n <= last
    member = mine and covered
    claimed = member or not covered
  end
  if claimed then
    local final = st
    if st == 'sent' then
      redis.call('HINCRBY', KEYS[2], 'sent', 1)
      local receipt = redis.call('HGET', KEYS[1], 'r' .. idx)
      if receipt then
        -- a delivery receipt arrived before this confirmation: apply it now
        local rst, rcode = string.match(receipt, '^([^|]*)|(.*)$')
        final = rst
        code = rcode
        if rst == 'failed' then rst = 'undelivered' end
        redis.call('HINCRBY', KEYS[2], rst, 1)
        redis.call('HDEL', KEYS[1], 'r' .. idx)
        if member then early = early - 1 end
      end
    elseif st == 'dead' then
      final = 'failed'
      redis.call('HINCRBY', KEYS[2], 'failed', 1)
      redis.call('HINCRBY', KEYS[2], 'dead_letters', 1)
      redis.call('SADD', KEYS[3], ARGV[3] .. ':' .. idx)
    elseif st ~= 'retry' and st ~= 'doubt' then
      redis.call('HINCRBY', KEYS[2], st, 1)
    end
    if st == 'dead' and code == 'in_doubt' then
      redis.call('HINCRBY', KEYS[2], 'in_doubt', 1)
    end
    local value = final .. '|' .. att .. '||' .. pid .. '|' .. code .. '|' .. now
    if st == 'doubt' then
      -- still in doubt (a group member whose request's answer was lost): a 'sending' record of
      -- its own, issued at 'code', that the next run reconciles
      value = 'sending|' .. att .. '|' .. owner .. '|||' .. code
    end
    if provider ~= '' then value = value .. '|' .. provider end
    redis.call('HSET', KEYS[1], idx, value)
    if member then members = members - 1 end
    applied = applied + 1
  end
end

if mine then
  local st = ARGV[5]
  if members <= 0 then
    -- every member has a record of its own now: the group stands for nobody
    redis.call('HDEL', KEYS[1], 'g')
  elseif st == '' then
    redis.call('HSET', KEYS[1], 'g', table.concat({gst, gatt, gholder, gpid, gcode, gts, first, last, members}, '|'))
  else
    if st ~= 'retry' then
      redis.call('HINCRBY', KEYS[2], st, members)
    end
    local pid, code = ARGV[7], ARGV[8]
    redis.call('HSET', KEYS[1], 'g', table.concat({st, ARGV[6], '', pid, code, now, first, last, members}, '|'))
    applied = applied + members
    if st == 'sent' and early > 0 then
      -- delivery receipts that arrived before this confirmation: members get records of their own
      for n = first, last do
        local receipt = redis.call('HGET', KEYS[1], 'r' .. n)
        if receipt and redis.call('HEXISTS', KEYS[1], n) == 0 then
          local rst, rcode = string.match(receipt, '^([^|]*)|(.*)$')
          local member_pid = ''
          if pid ~= '' then member_pid = pid .. ARGV[9] .. n end
          redis.call('HSET', KEYS[1], n, rst .. '|' .. ARGV[6] .. '||' .. member_pid .. '|' .. rcode .. '|' .. now)
          if rst == 'failed' then rst = 'undelivered' end
          redis.call('HINCRBY', KEYS[2], rst, 1)
          redis.call('HDEL', KEYS[1], 'r' .. n)
          early = early - 1
        end
      end
    end
  end
end
if early > 0 then
  redis.call('HSET', KEYS[1], 'rn', early)
else
  redis.call('HDEL', KEYS[1], 'rn')
end
return applied
