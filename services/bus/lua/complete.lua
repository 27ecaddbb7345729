-- complete(task_id, owner, outcome) -> {'ok'} | {'err', error}
local t, e = find(ARG(1), ARG(2))
if not e then e = check_open(t) end
if e then return {'err', e} end
signed(t)
redis.call('HSET', P .. 't:' .. t.id, 'outcome', ARG(3))
finish(t, 'done', nil)
return {'ok'}
