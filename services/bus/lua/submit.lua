-- submit(session, task_id, lease, llm, owner, limit, pickup_timeout, timeout, share_key,
--        kind, streaming, payload, require_live)
--   -> {'ok', task_id[, wake_at]} | {'full'} | {'offline'}
local sid, id, lease, llm, owner = ARG(1), ARG(2), ARG(3), ARG(4), ARG(5)
local limit, pickup, timeout = tonumber(ARG(6)), tonumber(ARG(7)), tonumber(ARG(8))
local share, kind, streaming, payload = ARG(9), ARG(10), ARG(11), ARG(12)
local life = pickup + timeout + MARGIN

if ARG(13) == '1' and not session_live(sid) then return {'offline'} end

-- limit '': a request the fair queue admitted, counted there.
if limit and not take_lease(P .. 'n:' .. llm, lease, limit, life) then return {'full'} end

if share ~= '' then
  local joined = redis.call('GET', P .. 'sh:' .. share)
  local t = joined and load(joined)
  if t then
    advance(t)
    cancel_if_orphaned(t)
  end
  if t and OPEN[t.state] then
    redis.call('HSET', P .. 'h:' .. joined, lease, WORKER)
    return {'ok', joined}
  end
  redis.call('SET', P .. 'sh:' .. share, id, 'PX', ms(life))
end

local key = P .. 't:' .. id
redis.call('HSET', key, 'state', 'queued', 'session', sid, 'owner', owner, 'kind', kind,
           'llm', llm, 'streaming', streaming, 'share', share, 'pickup_at', NOW + pickup,
           'pickup', pickup, 'timeout', timeout, 'received', 0, 'done', 0, 'attempt', 0,
           'payload', payload)
redis.call('PEXPIRE', key, ms(life))
redis.call('HSET', P .. 'h:' .. id, lease, WORKER)
redis.call('PEXPIRE', P .. 'h:' .. id, ms(life))
redis.call('SADD', P .. 'st:' .. sid, id)
extend(P .. 'st:' .. sid, life)
-- A session seen for the first time counts as signed from now (not lost at once).
redis.call('HSETNX', P .. 's:' .. sid, 'signed', NOW)
extend(P .. 's:' .. sid, life)
queue_push(sid, id, pickup + MARGIN)
gauge_move({id = id, llm = llm, pickup_at = NOW + pickup}, nil, 'w')
-- When time first moves the new task: its first wait sleeps until then.
return {'ok', id, tostring(wake_at({state = 'queued', pickup_at = NOW + pickup, session = sid}))}
