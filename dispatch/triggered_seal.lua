-- Seal the open batch of a triggered campaign, atomically (safe with any number of sealers).
-- KEYS[1] the campaign's state hash, KEYS[2] its manifest, KEYS[3] sealed batches waiting for an
-- enqueue (zset, member "cid|n|0", score = sealed at), KEYS[4] registry of triggered campaigns
-- ARGV[1] campaign id, ARGV[2] batch key prefix, ARGV[3] open-list key prefix, ARGV[4] snapshot
-- TTL (s), ARGV[5] now, ARGV[6] forget the campaign when nothing is open and it opened no batch
-- since this instant (it has rotated out)
-- The batch string is the engine's snapshot format `[not_before, [row, ...]]` made by joining the
-- stored JSON rows (rows that must wait were given batches of their own, so not_before is 0).
-- Returns the sealed member, or false when nothing was open.
local open = redis.call('HGET', KEYS[1], 'open')
if not open then
  local seen = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if seen and tonumber(seen) < tonumber(ARGV[6]) then
    redis.call('ZREM', KEYS[4], ARGV[1])
  end
  return false
end
local list = ARGV[3] .. open
local rows = redis.call('LRANGE', list, 0, -1)
if #rows == 0 then
  return false
end
redis.call('SET', ARGV[2] .. open, '[0,[' .. table.concat(rows, ',') .. ']]', 'EX', ARGV[4])
redis.call('DEL', list)
redis.call('HDEL', KEYS[1], 'open')
local member = ARGV[1] .. '|' .. open .. '|0'
redis.call('ZADD', KEYS[3], ARGV[5], member)
local manifest = redis.call('GET', KEYS[2])
if manifest then
  local accepted = redis.call('HGET', KEYS[1], 'accepted') or '0'
  local batches = tonumber(open) + 1
  local current = tonumber(string.match(manifest, '"batches":(%d+)')) or 0
  if batches < current then
    batches = current
  end
  manifest = string.gsub(manifest, '"total":%d+', '"total":' .. accepted, 1)
  manifest = string.gsub(manifest, '"accepted":%d+', '"accepted":' .. accepted, 1)
  manifest = string.gsub(manifest, '"batches":%d+', '"batches":' .. batches, 1)
  redis.call('SET', KEYS[2], manifest, 'KEEPTTL')
end
return member
