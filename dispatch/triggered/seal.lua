-- Seal the open batch of a triggered campaign, atomically (safe with any number of sealers).
-- KEYS[1] the campaign's state hash, KEYS[2] its manifest, KEYS[3] sealed batches waiting for an
-- enqueue (zset, member "cid|n|0", score = sealed at), KEYS[4] registry of triggered campaigns
-- ARGV[1] campaign id, ARGV[2] batch key prefix, ARGV[3] open-list key prefix, ARGV[4] snapshot
-- TTL (s), ARGV[5] now, ARGV[6] '1' when the campaign is over (its hour ended): with nothing
-- open it is closed, i.e. its manifest's "accepted" becomes the real count (while open it is one
-- more, so the workers do not finalize it) and it leaves the registry
-- The batch string is the engine's snapshot format `[not_before, [row, ...]]` made by joining the
-- stored JSON rows (rows that must wait were given batches of their own, so not_before is 0).
-- Returns the sealed member, or false when nothing was open.
local function rewrite_manifest(batches, extra)
  local manifest = redis.call('GET', KEYS[2])
  if not manifest then
    return
  end
  local accepted = tonumber(redis.call('HGET', KEYS[1], 'accepted') or '0')
  local current = tonumber(string.match(manifest, '"batches":(%d+)')) or 0
  if batches < current then
    batches = current
  end
  manifest = string.gsub(manifest, '"total":%d+', '"total":' .. accepted, 1)
  manifest = string.gsub(manifest, '"accepted":%d+', '"accepted":' .. (accepted + extra), 1)
  manifest = string.gsub(manifest, '"batches":%d+', '"batches":' .. batches, 1)
  redis.call('SET', KEYS[2], manifest, 'KEEPTTL')
end

local open = redis.call('HGET', KEYS[1], 'open')
if not open then
  if ARGV[6] == '1' then
    rewrite_manifest(0, 0)
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
rewrite_manifest(tonumber(open) + 1, 1)
return member
