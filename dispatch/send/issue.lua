-- Mark messages 'sending' as their request is issued (compare-and-set), atomically.
-- KEYS[1] message records hash of the batch
-- ARGV[1] owner (worker id), ARGV[2] now (unix s), then triples: field (a message index, or 'g'
-- for the batch's group record), attempts so far, provider name.
-- A message may be issued when it has no record, or its record is 'retry', or it is 'sending'
-- held by this owner (a retry round of this run, or an in-doubt message this run re-owned and
-- found not sent). Anything else (another worker's, or final) is not issued.
-- A group record keeps its range and member count (fields 7..9); its provider is not stored.
-- Returns one 1 (issued) or 0 (not) per triple.
local owner, now = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 3 do
  local field, att, provider = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local rec = redis.call('HGET', KEYS[1], field)
  local ok = 0
  if field == 'g' then
    if rec then
      local st, holder, f, l, n =
        string.match(rec, '^([^|]*)|[^|]*|([^|]*)|[^|]*|[^|]*|[^|]*|([^|]*)|([^|]*)|([^|]*)$')
      if (st == 'retry' and (holder == owner or holder == '')) or (st == 'sending' and holder == owner) then
        redis.call('HSET', KEYS[1], 'g', table.concat({'sending', att, owner, '', '', now, f, l, n}, '|'))
        ok = 1
      end
    end
  else
    local st, holder
    if rec then
      st, holder = string.match(rec, '^([^|]*)|[^|]*|([^|]*)|')
    end
    if not rec or st == 'retry' or (st == 'sending' and holder == owner) then
      redis.call('HSET', KEYS[1], field, table.concat({'sending', att, owner, '', '', now, provider}, '|'))
      ok = 1
    end
  end
  out[#out + 1] = ok
end
return out
