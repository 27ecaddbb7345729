-- queue_leave(queue, token, entry): the request is done or gives up. Idempotent.
local queue, token, entry = ARG(1), ARG(2), ARG(3)
local member = redis.call('HGET', fq(queue, 'g'), entry)
redis.call('LREM', fq(queue, 'w:' .. token), 0, entry)
if redis.call('LLEN', fq(queue, 'w:' .. token)) == 0 then
  redis.call('ZREM', fq(queue, 'ring'), token)
end
drop_entry(queue, entry)
if member then
  redis.call('HDEL', fq(queue, 'g'), entry)
  redis.call('HDEL', P .. 'c:' .. member, entry)
  for _, other in ipairs(redis.call('SMEMBERS', P .. 'fqof:' .. member)) do dispatch(other) end
end
return 1
