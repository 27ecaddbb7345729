-- push_chunks(task_id, owner, seq, done, max_buffered, chunk...) -> {'ok'} | {'err', error}
-- (the rules: `push_chunks` in prelude.lua)
local e = push_chunks(ARG(1), ARG(2), '', ARG(3), ARG(4) == '1', tonumber(ARG(5)), 6, NARGS() - 5)
if e then return {'err', e} end
return {'ok'}
