-- queue_enter(queue, token, entry, members_json, limit, per_token, timeout)
--   -> {'granted', member} | {'queued', position} | {'full'} | {'token_full'}
local queue, token, entry, members = ARG(1), ARG(2), ARG(3), cjson.decode(ARG(4))
local limit, per_token, timeout = tonumber(ARG(5)), tonumber(ARG(6)), tonumber(ARG(7))
local life = timeout + MARGIN
local list = fq(queue, 'w:' .. token)
if redis.call('LLEN', list) >= per_token then return {'token_full'} end
if not take_lease(P .. 'n:' .. queue, entry, limit, life) then return {'full'} end

redis.call('DEL', fq(queue, 'm'))
for _, member in ipairs(members) do
  redis.call('HSET', fq(queue, 'm'), member.n, cjson.encode({c = member.c, s = member.s}))
  redis.call('SADD', P .. 'fqof:' .. member.n, queue)
  extend(P .. 'fqof:' .. member.n, life)
end
local seq = redis.call('INCR', fq(queue, 'seq'))
redis.call('HSET', fq(queue, 'e'), entry, cjson.encode({t = token, w = WORKER, d = NOW + timeout}))
redis.call('RPUSH', list, entry)
local ring = fq(queue, 'ring')
if not redis.call('ZSCORE', ring, token) then
  local last = redis.call('HGET', fq(queue, 'last'), token)
  redis.call('ZADD', ring, last and tonumber(last) or seq / 1e12, token)
end
for _, part in ipairs({'m', 'e', 'w:' .. token, 'ring', 'last', 'seq', 'turn'}) do
  extend(fq(queue, part), life)
end

dispatch(queue)  -- in turn: it goes now only if nobody was ahead and a member has room
local member = redis.call('HGET', fq(queue, 'g'), entry)
if member then return {'granted', member} end
return {'queued', position(queue, token, entry)}
