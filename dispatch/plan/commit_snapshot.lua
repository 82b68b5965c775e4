-- Commit a staged plan: the staged batches become the campaign's batches and the manifest is
-- written, all at once; the manifest's presence is the commit point (dispatch.snapshot).
-- KEYS[1]: the manifest; KEYS[2 .. n+1]: staged batches 0..n-1; KEYS[n+2 .. 2n+1]: their final names.
-- ARGV[1]: the manifest; ARGV[2]: TTL in ms of the manifest and every batch; ARGV[3]: n.
-- Returns 1 (committed), 0 (a manifest already exists: nothing changed), -1 (a staged batch is
-- gone, e.g. expired: nothing changed).
local n = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
for i = 2, n + 1 do
    if redis.call('EXISTS', KEYS[i]) == 0 then
        return -1
    end
end
local ttl = tonumber(ARGV[2])
for i = 2, n + 1 do
    redis.call('RENAME', KEYS[i], KEYS[i + n])
    redis.call('PEXPIRE', KEYS[i + n], ttl)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
return 1
