-- End a batch's run: drop its lease (field 'L') when this owner holds it.
-- KEYS[1] message records hash of the batch; ARGV[1] owner
local lease = redis.call('HGET', KEYS[1], 'L')
if lease and string.match(lease, '^([^|]*)') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'L')
  return 1
end
return 0
