-- push_chunks_batch(session, owner, max_buffered, {task_id, seq, done, count, chunk...}...)
--   -> per entry, in order: '' (accepted) or its error
-- Many streams of one session in one call: each entry follows every rule of
-- push_chunks (prelude.lua), and one entry's error never stops the others.
local session, owner, max_buffered = ARG(1), ARG(2), tonumber(ARG(3))
local results, i, last = {}, 4, NARGS()
while i <= last do
  local count = tonumber(ARG(i + 3))
  results[#results + 1] = push_chunks(ARG(i), owner, session, ARG(i + 1), ARG(i + 2) == '1',
                                      max_buffered, i + 4, count) or ''
  i = i + 4 + count
end
return results
