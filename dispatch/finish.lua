-- Record outcomes of claimed messages and count them, atomically (track step).
-- KEYS[1] records hash, KEYS[2] campaign counters hash, KEYS[3] dead-letter set
-- ARGV[1] owner, ARGV[2] now, ARGV[3] batch number, ARGV[4] retries made (counter delta),
-- then groups of 5: index, state, attempts, provider_id, code
-- state is one of sent, failed, suppressed, skipped, retry (claimable again), dead (failed and
-- dead-lettered). Only records still claimed by this owner change, so a batch taken over by
-- another worker is never counted twice.
local applied = 0
local retries = tonumber(ARGV[4])
if retries > 0 then
  redis.call('HINCRBY', KEYS[2], 'retries', retries)
end
for i = 5, #ARGV, 5 do
  local idx, st, att, pid, code = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local rec = redis.call('HGET', KEYS[1], idx)
  if rec then
    local cur, owner = string.match(rec, '^([^|]*)|[^|]*|([^|]*)|')
    if cur == 'sending' and owner == ARGV[1] then
      local final = st
      if st == 'sent' then
        redis.call('HINCRBY', KEYS[2], 'sent', 1)
        local early = redis.call('HGET', KEYS[1], 'r' .. idx)
        if early then
          -- a delivery receipt arrived before this confirmation: apply it now
          local rst, rcode = string.match(early, '^([^|]*)|(.*)$')
          final = rst
          code = rcode
          if rst == 'failed' then rst = 'undelivered' end
          redis.call('HINCRBY', KEYS[2], rst, 1)
          redis.call('HDEL', KEYS[1], 'r' .. idx)
        end
      elseif st == 'dead' then
        final = 'failed'
        redis.call('HINCRBY', KEYS[2], 'failed', 1)
        redis.call('HINCRBY', KEYS[2], 'dead_letters', 1)
        redis.call('SADD', KEYS[3], ARGV[3] .. ':' .. idx)
      elseif st ~= 'retry' then
        redis.call('HINCRBY', KEYS[2], st, 1)
      end
      redis.call('HSET', KEYS[1], idx, final .. '|' .. att .. '||' .. pid .. '|' .. code .. '|' .. ARGV[2])
      applied = applied + 1
    end
  end
end
return applied
