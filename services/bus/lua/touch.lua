-- touch(session): the session has just registered: live, and signed, from now.
local sid = ARG(1)
redis.call('DEL', P .. 'x:' .. sid)
session_set(sid, 'polled', NOW, 'signed', NOW)
redis.call('ZADD', P .. 'g:live', 'GT', NOW + LIVENESS, sid)
extend(P .. 'g:live', LIVENESS + MARGIN)
return 1
