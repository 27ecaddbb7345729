-- poll_end(session, live_until, started_at): this worker holds no more polls of the
-- session; it stays live until live_until (SESSION_LIVENESS), unless it was dropped.
local sid, live_until, started = ARG(1), tonumber(ARG(2)), tonumber(ARG(3))
local dropped = redis.call('GET', P .. 'x:' .. sid)
if dropped and tonumber(dropped) >= started then return 0 end
redis.call('ZADD', P .. 'p:' .. sid, live_until, WORKER)
extend(P .. 'p:' .. sid, live_until - NOW + MARGIN)
return 1
