-- poll(session, max_tasks, live_until, started_at) -> {'dropped'} | {'ok', payload...}
-- Registers this worker's poll (the session is live while held) and hands over
-- up to max_tasks queued tasks (picking them) and cancel messages.
local sid, max_tasks, live_until, started = ARG(1), tonumber(ARG(2)), tonumber(ARG(3)),
  tonumber(ARG(4))
local dropped = redis.call('GET', P .. 'x:' .. sid)
if dropped and tonumber(dropped) >= started then return {'dropped'} end
redis.call('ZADD', P .. 'p:' .. sid, 'GT', live_until, WORKER)
extend(P .. 'p:' .. sid, live_until - NOW + MARGIN)
local reply = {'ok'}
local queue = P .. 'q:' .. sid
while #reply - 1 < max_tasks do
  local item = redis.call('LPOP', queue)
  if not item then break end
  if string.sub(item, 1, 1) == '{' then
    reply[#reply + 1] = item  -- a cancel message
  else
    local t = load(item)
    if t and t.state == 'queued' then
      expire_if_due(t)
      cancel_if_orphaned(t)
      if t.state == 'queued' then
        local payload = redis.call('HGET', P .. 't:' .. item, 'payload')
        pick(t)
        reply[#reply + 1] = payload
      end
    end
  end
end
return reply
