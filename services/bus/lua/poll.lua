-- poll(session, max_tasks, started_at, lease, acks_given, wait, ack...)
--   -> {'dropped'} | {'full'} | {'ok'} | {'ended', payload...}
-- Holds the poll (its lease, at most MAX_POLLS per session), takes the acks,
-- and hands over up to max_tasks queued tasks (picking them, counting the
-- attempt) and cancel messages. Called again with the same lease when woken.
-- A poll that hands something over ends in the same step (`end_poll`).
local sid, max_tasks, started, lease = ARG(1), tonumber(ARG(2)), tonumber(ARG(3)), ARG(4)
local acks_given = ARG(5) == '1'
local dropped = redis.call('GET', P .. 'x:' .. sid)
if dropped and tonumber(dropped) >= started then return {'dropped'} end
local held = P .. 'ph:' .. sid
if redis.call('HEXISTS', held, lease) == 0 then
  if not take_lease(held, lease, MAX_POLLS, WORKER_TTL + MARGIN) then return {'full'} end
  session_set(sid, 'signed', NOW)
  local held_until = started + tonumber(ARG(6)) + LIVENESS  -- ARG(6): the poll's wait
  redis.call('ZADD', P .. 'g:polls', held_until, lease)
  redis.call('ZADD', P .. 'g:live', 'GT', held_until, sid)
  for _, key in ipairs({'g:polls', 'g:live'}) do extend(P .. key, held_until - NOW + MARGIN) end
end
if acks_given then
  session_set(sid, 'acking', 1)
  for i = 7, NARGS() do
    local t = load(ARG(i))
    if t and t.session == sid and tonumber(t.attempt or 0) > 0 then
      if t.state == 'queued' then  -- queued again for want of this ack: take it back
        redis.call('LREM', P .. 'q:' .. sid, 0, t.id)
        pick(t)
      end
      if t.state == 'picked' then redis.call('HSET', P .. 't:' .. t.id, 'acked', 1) end
    end
  end
end
local acking = redis.call('HGET', P .. 's:' .. sid, 'acking') == '1'
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
      advance(t)
      cancel_if_orphaned(t)
      if t.state == 'queued' then
        local key = P .. 't:' .. item
        local attempt = tonumber(t.attempt or 0) + 1
        local payload = redis.call('HGET', key, 'payload')
        pick(t)
        redis.call('HSET', key, 'attempt', attempt, 'delivered_at', NOW, 'acked', 0,
                   'ack_req', acking and 1 or 0)
        -- The payload is JSON written by Python: add "attempt" without decoding
        -- it (cjson would turn the body's empty lists into objects).
        reply[#reply + 1] = string.sub(payload, 1, -2) .. ',"attempt":' .. attempt .. '}'
      end
    end
  end
end
if #reply > 1 then
  reply[1] = 'ended'
  end_poll(sid, lease, started)
end
return reply
