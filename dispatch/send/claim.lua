-- Take a batch's run and read its messages' states (dedup step), atomically. Nothing is marked
-- 'sending' here: a message becomes 'sending' only as its request is issued (issue.lua), so a
-- message this run never issues stays claimable by the next one.
-- KEYS[1] message records hash of the batch, KEYS[2] campaign control hash
-- ARGV[1] owner (worker id), ARGV[2] now (unix s), ARGV[3] liveness key prefix,
-- ARGV[4] records TTL (s), ARGV[5] this run ('<campaign>|<batch>'), ARGV[6..] message indices
-- Record format: state|attempts|owner|provider_id|code|ts[|provider]
-- The batch's run is a lease, field 'L' = owner: a live other owner's lease -> {-2} (the batch
-- is being sent elsewhere; try later). Returns {-1} when the campaign is not running, else per
-- index three values: code (0 done: terminal, skip; 1 claimable; 2 in doubt: issued by a run that
-- is gone, it may have reached the provider; 3 busy: not given since the lease), attempts
-- so far, and for code 2 the record's ts (when it was issued) and provider, for a 'retry' record
-- 'retry' (it has been answered since any send: not a record a restart lost), else ''.
-- An in-doubt record is re-owned (owner = ARGV[1], ts and provider kept): if this run dies too,
-- it is in doubt again for the next.
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
local owner, alive = ARGV[1], ARGV[3]
if lease_live(redis.call('HGET', KEYS[1], 'L'), owner, alive, ARGV[5], ARGV[2]) then
  return {-2}
end
redis.call('HSET', KEYS[1], 'L', owner .. '|' .. ARGV[2])
local out = {}
for i = 6, #ARGV do
  local idx = ARGV[i]
  local rec = redis.call('HGET', KEYS[1], idx)
  local code, attempts, extra = 1, 0, ''
  if rec then
    local st, att, holder, pid, rcode, ts, provider =
      string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|?([^|]*)$')
    attempts = tonumber(att) or 0
    if st == 'sending' then
      -- a request is on the wire only while its run holds the lease, and this run holds it now:
      -- whoever issued it (a dead worker, a live one whose run ended without an answer, our own
      -- process earlier) no longer has it in flight, so it is in doubt
      code = 2
      extra = ts .. '|' .. (provider or '')
      redis.call('HSET', KEYS[1], idx, table.concat({st, att, owner, pid, rcode, ts, provider or ''}, '|'))
    elseif st == 'retry' then
      code = 1
      extra = 'retry'
    else
      code = 0
    end
  end
  out[#out + 1] = code
  out[#out + 1] = attempts
  out[#out + 1] = extra
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return out
