-- poll_end(session, lease, started_at): the poll is no longer held; the session
-- stays live for SESSION_LIVENESS from now, unless it was dropped meanwhile.
local sid, lease, started = ARG(1), ARG(2), tonumber(ARG(3))
redis.call('HDEL', P .. 'ph:' .. sid, lease)
redis.call('ZREM', P .. 'g:polls', lease)
local dropped = redis.call('GET', P .. 'x:' .. sid)
if dropped and tonumber(dropped) >= started then return 0 end
session_set(sid, 'polled', NOW, 'signed', NOW)
if polls_held(sid) == 0 then redis.call('ZADD', P .. 'g:live', NOW + LIVENESS, sid) end
return 1
