-- is_live(session) -> 1 while a poll is held (on a live worker), or ended (or the
-- session registered) less than SESSION_LIVENESS ago.
local sid = ARG(1)
if polls_held(sid) > 0 then return 1 end
local polled = redis.call('HGET', P .. 's:' .. sid, 'polled')
return (polled and NOW - tonumber(polled) < LIVENESS) and 1 or 0
