-- touch(session, live_until): the session has just registered.
local sid, live_until = ARG(1), tonumber(ARG(2))
redis.call('DEL', P .. 'x:' .. sid)
redis.call('ZADD', P .. 'p:' .. sid, 'GT', live_until, WORKER)
extend(P .. 'p:' .. sid, live_until - NOW + MARGIN)
return 1
