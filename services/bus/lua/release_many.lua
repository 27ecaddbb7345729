-- release_many(task_id, lease, llm, task_id, lease, llm, ...) -> the number of
-- tasks whose last waiting request this was: `release` for each triple.
local last = 0
for i = 1, NARGS(), 3 do
  if release(ARG(i), ARG(i + 1), ARG(i + 2)) then last = last + 1 end
end
return last
