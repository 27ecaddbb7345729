-- drop(session, reason, memory_seconds) -> how many unfinished tasks failed.
-- Fails the session's tasks, ends the polls held now (x:<session>) and forgets it.
local sid, reason, memory = ARG(1), ARG(2), tonumber(ARG(3))
local failed = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'st:' .. sid)) do
  local t = load(id)
  if t and finish(t, 'failed', err(503, 'publisher_disconnected',
                                     "LLM '" .. t.llm .. "': " .. reason)) then
    failed = failed + 1
  end
end
redis.call('SET', P .. 'x:' .. sid, NOW, 'PX', ms(memory))
notify_session(sid)
local held = redis.call('HKEYS', P .. 'ph:' .. sid)
if #held > 0 then redis.call('ZREM', P .. 'g:polls', unpack(held)) end
redis.call('ZREM', P .. 'g:live', sid)
redis.call('DEL', P .. 'ph:' .. sid, P .. 's:' .. sid, P .. 'st:' .. sid, P .. 'q:' .. sid)
return failed
