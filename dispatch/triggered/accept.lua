-- Accept one triggered message, atomically: Idempotency-Key, suppression, frequency cap, append
-- to the open batch.
-- KEYS[1] idempotency record (string), KEYS[2] suppression set of the channel, KEYS[3] global
-- suppression set, KEYS[4] the triggered campaign's state hash (next, open, accepted, suppressed,
-- frequency_capped), KEYS[5] its manifest, KEYS[6] sealed batches waiting for an enqueue (zset,
-- member "cid|n|not_before", score = sealed at), KEYS[7] registry of triggered campaigns (zset),
-- KEYS[8] the address's frequency-cap set (frequency.lua's key: send times in ms)
-- ARGV[1] request fingerprint, ARGV[2] address hash, ARGV[3] campaign id, ARGV[4] batch key
-- prefix (key = prefix .. n), ARGV[5] open-list key prefix, ARGV[6] row head (`["<recipient>#`),
-- ARGV[7] row tail (`",<address>,<attrs>]`), ARGV[8] not-before ('0' = now; else the row gets a
-- batch of its own, written at once), ARGV[9] seal size, ARGV[10] snapshot TTL (s),
-- ARGV[11] idempotency TTL (s), ARGV[12] now (unix s), ARGV[13] not-before answered to the
-- caller (kept in the idempotency record so a replay answers the same body), ARGV[14] frequency
-- limit ('0' = no cap), ARGV[15] frequency window start (ms, exclusive)
-- The frequency cap is read the way frequency.lua's count mode reads it (sends recorded after the
-- window start); nothing is recorded here: the workers record a send when they make it.
-- The row id is "<recipient>#<batch>.<index>", unique per message (the provider idempotency key is
-- derived from it). The idempotency record is "fingerprint|state|not_before|message_id".
-- Returns {0, stored record} for a known key (the caller compares fingerprints), else
-- {1, message_id, state, sealed member or ''}.
local stored = redis.call('GET', KEYS[1])
if stored then
  return {0, stored}
end
local cid, nb, now = ARGV[3], ARGV[8], ARGV[12]
local ttl = tonumber(ARGV[10])

local function remember(state, message_id)
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. state .. '|' .. ARGV[13] .. '|' .. message_id, 'EX', ARGV[11])
end

if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 or redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
  local k = redis.call('HINCRBY', KEYS[4], 'suppressed', 1)
  local message_id = cid .. '.s.' .. k
  remember('suppressed', message_id)
  return {1, message_id, 'suppressed', ''}
end

local limit = tonumber(ARGV[14])
if limit > 0 and redis.call('ZCOUNT', KEYS[8], '(' .. ARGV[15], '+inf') >= limit then
  local k = redis.call('HINCRBY', KEYS[4], 'frequency_capped', 1)
  local message_id = cid .. '.f.' .. k
  remember('frequency_capped', message_id)
  return {1, message_id, 'frequency_capped', ''}
end

-- the manifest's counts follow the campaign, so `dispatch status` and `export` see every batch;
-- its "accepted" stays one above the real count until the campaign closes (seal.lua),
-- so workers never finalize a campaign that may still get messages
local function bump_manifest(batches, accepted)
  local manifest = redis.call('GET', KEYS[5])
  if not manifest then
    return
  end
  local current = tonumber(string.match(manifest, '"batches":(%d+)')) or 0
  if batches < current then
    batches = current
  end
  manifest = string.gsub(manifest, '"total":%d+', '"total":' .. accepted, 1)
  manifest = string.gsub(manifest, '"accepted":%d+', '"accepted":' .. (accepted + 1), 1)
  manifest = string.gsub(manifest, '"batches":%d+', '"batches":' .. batches, 1)
  redis.call('SET', KEYS[5], manifest, 'KEEPTTL')
end

local accepted = redis.call('HINCRBY', KEYS[4], 'accepted', 1)
if nb ~= '0' then
  -- held (quiet hours): a batch of its own, so it never delays anybody else
  local n = redis.call('HINCRBY', KEYS[4], 'next', 1) - 1
  local row = ARGV[6] .. n .. '.0' .. ARGV[7]
  redis.call('SET', ARGV[4] .. n, '[' .. nb .. ',[' .. row .. ']]', 'EX', ttl)
  local member = cid .. '|' .. n .. '|' .. nb
  redis.call('ZADD', KEYS[6], now, member)
  redis.call('ZADD', KEYS[7], now, cid)
  redis.call('EXPIRE', KEYS[4], ttl)
  bump_manifest(n + 1, accepted)
  local message_id = cid .. '.' .. n .. '.0'
  remember('queued', message_id)
  return {1, message_id, 'queued', member}
end

local open = redis.call('HGET', KEYS[4], 'open')
if not open then
  open = redis.call('HINCRBY', KEYS[4], 'next', 1) - 1
  redis.call('HSET', KEYS[4], 'open', open)
  redis.call('EXPIRE', KEYS[4], ttl)
  redis.call('ZADD', KEYS[7], now, cid)
end
local list = ARGV[5] .. open
local index = redis.call('LLEN', list)
local size = redis.call('RPUSH', list, ARGV[6] .. open .. '.' .. index .. ARGV[7])
if size == 1 then
  redis.call('EXPIRE', list, ttl)
end
local message_id = cid .. '.' .. open .. '.' .. index
remember('queued', message_id)
local sealed = ''
if size >= tonumber(ARGV[9]) then
  -- full: seal it now (the same steps as seal.lua)
  local rows = redis.call('LRANGE', list, 0, -1)
  redis.call('SET', ARGV[4] .. open, '[0,[' .. table.concat(rows, ',') .. ']]', 'EX', ttl)
  redis.call('DEL', list)
  redis.call('HDEL', KEYS[4], 'open')
  sealed = cid .. '|' .. open .. '|0'
  redis.call('ZADD', KEYS[6], now, sealed)
  bump_manifest(tonumber(open) + 1, accepted)
end
return {1, message_id, 'queued', sealed}
