-- complete(task_id, owner, outcome, unless_kind)
--   -> {'ok'} | {'err', error} | {'left', session, owner, kind, llm} (a task of unless_kind)
local t, e = find(ARG(1), ARG(2))
if not e then e = check_open(t) end
if e then return {'err', e} end
signed(t)
if t.kind == ARG(4) then return {'left', t.session, t.owner, t.kind, t.llm} end
redis.call('HSET', P .. 't:' .. t.id, 'outcome', ARG(3))
finish(t, 'done', nil)
return {'ok'}
