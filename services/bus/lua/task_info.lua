-- task_info(task_id, owner) -> {'ok', session, owner, kind, llm} | {'err', error}
local t, e = find(ARG(1), ARG(2))
if not e then e = check_open(t) end
if e then return {'err', e} end
return {'ok', t.session, t.owner, t.kind, t.llm}
