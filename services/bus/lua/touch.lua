-- touch(session): the session has just registered: live, and signed, from now.
local sid = ARG(1)
redis.call('DEL', P .. 'x:' .. sid)
session_set(sid, 'polled', NOW, 'signed', NOW)
return 1
