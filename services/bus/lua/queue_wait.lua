-- queue_wait(queue, token, entry) -> {'granted', member} | {'queued', position} | {'timeout'}
-- Dispatches first: turns may have lapsed (a dead worker's) rather than been given back.
local queue, token, entry = ARG(1), ARG(2), ARG(3)
dispatch(queue)
local member = redis.call('HGET', fq(queue, 'g'), entry)
if member then return {'granted', member} end
local data = redis.call('HGET', fq(queue, 'e'), entry)
if not data or NOW >= cjson.decode(data).d then
  redis.call('LREM', fq(queue, 'w:' .. token), 0, entry)
  drop_entry(queue, entry)
  return {'timeout'}
end
return {'queued', position(queue, token, entry)}
