-- Shared by every script of the Redis task bus (services/bus/redis.py).
--
-- ARGV[1] key prefix, ARGV[2] now (wall clock, seconds), ARGV[3] this worker's
-- id; a script's own arguments follow (ARG(1) is ARGV[4]). Task keys are named
-- from data, not passed as KEYS: the bus needs one Redis (or a Sentinel
-- primary), not a Cluster.
--
-- Keys, each with a TTL:
--   workers        zset  worker -> alive until (every script and heartbeat renew it)
--   t:<task>       hash  the task: state, session, owner, kind, llm, deadlines, outcome ...
--   h:<task>       hash  lease -> worker: the requests waiting on the task
--   c:<task>       list  stream chunks not yet read by the client
--   q:<session>    list  task ids and cancel messages for the session's polls
--   st:<session>   set   the session's unfinished tasks
--   s:<session>    hash  polled (last poll ended), signed (last sign of life), acking
--   ph:<session>   hash  lease -> worker: the polls held now
--   x:<session>    string when the session was dropped (ends polls held at that moment)
--   g:w:<llm>, g:f:<llm>  zset task -> deadline: waiting for a poll / picked, unfinished
--   g:llms         set   the LLMs with such tasks; g:polls zset lease -> held until;
--   g:live         zset  session -> live until; g:redeliveries: a counter (metrics)
--   n:<llm>        hash  lease -> worker: requests waiting on or in flight at the LLM
--   sh:<key>       string the task id a shared wake is joined to
--   routes         string public LLMs' rows version (routes_changed.lua)
-- Channel w:<worker>: "t:<task>" (the task changed), "s:<session>" (its queue did),
-- "f:<task>\n<state>\n<llm>\n<error>\n<outcome>" (a task not streamed ended so),
-- "q:<entry>" (a fair-queue turn was granted), "beat" (the heartbeat).

local P, NOW, WORKER = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function ARG(i) return ARGV[3 + i] end
local function NARGS() return #ARGV - 3 end

local TRANSITIONS = {{TRANSITIONS}}
local OPEN = {queued = true, picked = true}
local WORKER_TTL = {{WORKER_TTL}}
local TOMBSTONE_MS = {{TOMBSTONE_MS}}
local MARGIN = {{MARGIN}}
local LIVENESS = {{SESSION_LIVENESS}}
local ACK_TIMEOUT = {{ACK_TIMEOUT}}
local MAX_ATTEMPTS = {{MAX_ATTEMPTS}}
local LOST_TIMEOUT = {{LOST_TIMEOUT}}
local MAX_POLLS = {{MAX_POLLS}}
local LOST_LABEL = '{{LOST_LABEL}}'

redis.call('ZADD', P .. 'workers', NOW + WORKER_TTL, WORKER)
redis.call('PEXPIRE', P .. 'workers', math.ceil(WORKER_TTL * 3000))

local function ms(seconds) return math.ceil(seconds * 1000) end

-- Give `key` at least `seconds` more to live (never shorten it).
local function extend(key, seconds)
  if redis.call('PTTL', key) < ms(seconds) then redis.call('PEXPIRE', key, ms(seconds)) end
end

local function err(status, code, message, details, headers)
  return cjson.encode({status = status, code = code, message = message,
                       details = details or {}, headers = headers or {}})
end

local alive_cache = {}
local function alive(worker)
  local known = alive_cache[worker]
  if known == nil then
    local score = redis.call('ZSCORE', P .. 'workers', worker)
    known = score ~= false and tonumber(score) > NOW
    alive_cache[worker] = known
  end
  return known
end

-- Live entries of a lease hash (lease -> worker); dead workers' entries are dropped.
local function live_leases(key)
  local flat = redis.call('HGETALL', key)
  local count, workers, seen = 0, {}, {}
  for i = 1, #flat, 2 do
    local worker = flat[i + 1]
    if alive(worker) then
      count = count + 1
      if not seen[worker] then seen[worker] = true; workers[#workers + 1] = worker end
    else
      redis.call('HDEL', key, flat[i])
    end
  end
  return count, workers
end

local FIELDS = {'state', 'session', 'owner', 'kind', 'llm', 'streaming', 'share', 'pickup_at',
                'timeout', 'finish_at', 'activity', 'received', 'done', 'pickup', 'attempt',
                'delivered_at', 'acked', 'ack_req'}
local function load(id)
  local values = redis.call('HMGET', P .. 't:' .. id, unpack(FIELDS))
  if not values[1] then return nil end
  local t = {id = id}
  for i, field in ipairs(FIELDS) do t[field] = values[i] end
  return t
end

-- Tell the workers whose requests wait on the task: `message`, or "t:<task>"
-- (it changed: look again).
local function notify_task(id, message)
  local _, workers = live_leases(P .. 'h:' .. id)
  message = message or 't:' .. id
  for _, worker in ipairs(workers) do redis.call('PUBLISH', P .. 'w:' .. worker, message) end
end

-- The workers holding a poll of the session now.
local function notify_session(sid)
  local _, workers = live_leases(P .. 'ph:' .. sid)
  for _, worker in ipairs(workers) do redis.call('PUBLISH', P .. 'w:' .. worker, 's:' .. sid) end
end

local function polls_held(sid)
  return (live_leases(P .. 'ph:' .. sid))
end

-- Live: a poll held (on a live worker), or one ended (or the session
-- registered) less than SESSION_LIVENESS ago.
local function session_live(sid)
  if polls_held(sid) > 0 then return true end
  local polled = redis.call('HGET', P .. 's:' .. sid, 'polled')
  return polled ~= false and NOW - tonumber(polled) < LIVENESS
end

-- The session hash (polled, signed, acking) lives while the session may matter.
local function session_set(sid, ...)
  redis.call('HSET', P .. 's:' .. sid, ...)
  extend(P .. 's:' .. sid, math.max(LOST_TIMEOUT, LIVENESS) + MARGIN)
end

local function signed_at(sid)
  return tonumber(redis.call('HGET', P .. 's:' .. sid, 'signed') or 0)
end

-- A lost publisher: no poll held and no sign of life for LOST_TIMEOUT.
local function lost(sid)
  return polls_held(sid) == 0 and NOW >= signed_at(sid) + LOST_TIMEOUT
end

-- The gauges (`gauges.lua`): a task counted as waiting or in flight at its LLM
-- until its deadline, whatever becomes of its keys.
local GAUGE_TTL = 86400
local function gauge_move(t, from, to)
  if from then redis.call('ZREM', P .. 'g:' .. from .. ':' .. t.llm, t.id) end
  if to then
    local key = P .. 'g:' .. to .. ':' .. t.llm
    local deadline = tonumber(to == 'w' and t.pickup_at or t.finish_at)
    redis.call('ZADD', key, deadline, t.id)
    extend(key, deadline - NOW + MARGIN)
    redis.call('SADD', P .. 'g:llms', t.llm)
    extend(P .. 'g:llms', GAUGE_TTL)
  end
end

local function queue_push(sid, item, ttl)
  redis.call('RPUSH', P .. 'q:' .. sid, item)
  extend(P .. 'q:' .. sid, ttl)
  notify_session(sid)
end

-- Move the task to `state` if TRANSITIONS allows it; the task key becomes its own
-- tombstone (late posts get 409/410). Returns whether it moved.
local function finish(t, state, error_json)
  local moves = TRANSITIONS[t.state]
  if not moves or not moves[state] then return false end
  local key = P .. 't:' .. t.id
  local was = t.state
  gauge_move(t, was == 'queued' and 'w' or 'f', nil)
  t.state = state
  redis.call('HSET', key, 'state', state)
  if error_json then redis.call('HSET', key, 'error', error_json) end
  redis.call('HDEL', key, 'payload')
  if was == 'queued' then
    redis.call('LREM', P .. 'q:' .. t.session, 0, t.id)
  elseif state == 'cancelled' or state == 'expired' then
    queue_push(t.session, cjson.encode({kind = "cancel", task_id = t.id}), MARGIN)
  end
  redis.call('SREM', P .. 'st:' .. t.session, t.id)
  for _, suffix in ipairs({'t:', 'h:', 'c:'}) do
    redis.call('PEXPIRE', P .. suffix .. t.id, TOMBSTONE_MS)
  end
  -- Its requests no longer count at the LLM: the pending limit never waits
  -- for them to let go of the task (they do, after their answer went out).
  for _, waiter in ipairs(redis.call('HKEYS', P .. 'h:' .. t.id)) do
    redis.call('HDEL', P .. 'n:' .. t.llm, waiter)
  end
  if t.streaming == '1' then
    notify_task(t.id)
  else  -- the news carries the answer: the waiting request need not read it
    local outcome = redis.call('HGET', key, 'outcome')
    notify_task(t.id, table.concat({'f:' .. t.id, state, t.llm,
                                    error_json or '', outcome or ''}, '\n'))
  end
  return true
end

local function pick(t)
  t.state = 'picked'
  local key = P .. 't:' .. t.id
  if not t.finish_at then  -- a redelivery keeps the first delivery's deadline
    t.finish_at = NOW + tonumber(t.timeout)
    for _, suffix in ipairs({'t:', 'h:', 'c:'}) do
      redis.call('PEXPIRE', P .. suffix .. t.id, ms(tonumber(t.timeout) + MARGIN))
    end
  end
  redis.call('HSET', key, 'state', 'picked', 'finish_at', t.finish_at, 'activity', NOW)
  gauge_move(t, 'w', 'f')
end

local function awaiting_ack(t)
  return t.state == 'picked' and t.ack_req == '1' and t.acked ~= '1'
end

-- Not acknowledged in time: back to the head of the queue, with a fresh pickup deadline.
local function requeue(t)
  if not TRANSITIONS[t.state]['queued'] then return end
  t.state = 'queued'
  t.pickup_at = NOW + tonumber(t.pickup)
  redis.call('HSET', P .. 't:' .. t.id, 'state', 'queued', 'pickup_at', t.pickup_at)
  gauge_move(t, 'f', 'w')
  redis.call('INCR', P .. 'g:redeliveries')
  redis.call('EXPIRE', P .. 'g:redeliveries', 30 * GAUGE_TTL)
  redis.call('LPUSH', P .. 'q:' .. t.session, t.id)
  extend(P .. 'q:' .. t.session, tonumber(t.pickup) + MARGIN)
  notify_session(t.session)
  notify_task(t.id)
end

-- A post for the task: it is acknowledged, and its publisher alive.
local function signed(t)
  t.acked = '1'
  redis.call('HSET', P .. 't:' .. t.id, 'acked', 1)
  session_set(t.session, 'signed', NOW)
end

-- Expire the task when a deadline passed; deliver it again when its
-- acknowledgement is overdue; fail it when its publisher is lost.
local function advance(t)
  if t.state == 'queued' and NOW >= tonumber(t.pickup_at) then
    finish(t, 'expired', err(504, 'pickup_timeout',
      "The publisher of LLM '" .. t.llm .. "' did not pick up the task in time"))
  elseif t.state == 'picked' and NOW >= tonumber(t.finish_at) then
    finish(t, 'expired', err(504, 'task_timeout',
      "The publisher of LLM '" .. t.llm .. "' did not finish the task in time"))
  end
  if awaiting_ack(t) and NOW >= tonumber(t.delivered_at) + ACK_TIMEOUT then
    if tonumber(t.attempt) < MAX_ATTEMPTS then
      requeue(t)
    else
      finish(t, 'expired', err(504, 'task_not_acknowledged', "The publisher of LLM '" .. t.llm ..
        "' did not acknowledge the task (" .. t.attempt .. ' deliveries)'))
    end
  end
  if OPEN[t.state] and lost(t.session) then
    finish(t, 'failed', err(502, 'publisher_lost', "The publisher of LLM '" .. t.llm ..
      "' was lost: no sign of life for " .. LOST_LABEL .. ' s'))
  end
end

-- When time next moves the task (see `advance`).
local function wake_at(t)
  local at = tonumber(t.state == 'queued' and t.pickup_at or t.finish_at)
  if awaiting_ack(t) then at = math.min(at, tonumber(t.delivered_at) + ACK_TIMEOUT) end
  if polls_held(t.session) == 0 then at = math.min(at, signed_at(t.session) + LOST_TIMEOUT) end
  return at
end

-- A task whose every waiting request is gone (their workers died) is cancelled.
local function cancel_if_orphaned(t)
  if OPEN[t.state] and live_leases(P .. 'h:' .. t.id) == 0 then
    finish(t, 'cancelled', err(410, 'client_gone', 'The client went away'))
  end
end

-- The task a publisher may post for, or an error: 404, 403 (another owner's),
-- 409 (completed), 410 (cancelled, expired, failed). `owner` '' skips the owner check.
local function find(id, owner)
  local t = load(id)
  if not t then return nil, err(404, 'task_not_found', "Task '" .. id .. "' not found") end
  if owner ~= '' and owner ~= t.owner then
    return nil, err(403, 'foreign_task', "Task '" .. id .. "' belongs to another publisher")
  end
  return t
end

-- Bring the task's state up to date: deadlines passed, waiting requests all gone.
local function refresh(t)
  advance(t)
  cancel_if_orphaned(t)
end

local function check_open(t)
  refresh(t)
  if t.state == 'done' then
    return err(409, 'task_completed', "Task '" .. t.id .. "' is already completed")
  end
  if not OPEN[t.state] then
    return err(410, 'task_' .. t.state, "Task '" .. t.id .. "' was " .. t.state ..
               "; stop working on it")
  end
  return nil
end

-- Append a stream's chunks (push_chunks.lua, push_chunks_batch.lua): ARG(first)
-- .. ARG(first + count - 1) are the chunks. seq '' means "append"; a batch that
-- only repeats chunks already received is accepted, even after the stream
-- ended. '[DONE]' or done ends the stream. With `session` (not ''), a task of
-- another session is foreign. Returns nil, or the error.
local function push_chunks(id, owner, session, seq, done, max_buffered, first, count)
  local t, e = find(id, owner)
  if e then return e end
  if session ~= '' and t.session ~= session then
    return err(403, 'foreign_task', "Task '" .. id .. "' belongs to another session")
  end
  refresh(t)
  local received = tonumber(t.received)
  if seq ~= '' and tonumber(seq) + count <= received and (t.done == '1' or not done)
      and (OPEN[t.state] or t.state == 'done') then
    signed(t)
    return nil  -- a retry of what we have; but a stopped task says so (410)
  end
  e = check_open(t)
  if e then return e end
  if t.kind ~= 'infer' or t.streaming ~= '1' then
    return err(409, 'not_a_stream', "Task '" .. id .. "' is not a stream: post its result")
  end
  local start = seq == '' and received or tonumber(seq)
  if start > received then
    return err(409, 'seq_gap', 'Chunk seq ' .. seq .. ' leaves a gap: expected ' .. received,
               {expected_seq = received})
  end
  local key = P .. 'c:' .. id
  if redis.call('LLEN', key) + count > max_buffered then
    return err(429, 'too_many_pending', 'The client is not reading the stream fast enough',
               nil, {['Retry-After'] = '1'})
  end
  signed(t)
  local ended = false
  for i = received - start + 1, count do
    local data = ARG(first + i - 1)
    received = received + 1
    if string.match(data, '^%s*(.-)%s*$') == '[DONE]' then ended = true; break end
    redis.call('RPUSH', key, data)
  end
  if done then ended = true end
  if t.state == 'queued' then  -- answered without a poll: count it picked
    redis.call('LREM', P .. 'q:' .. t.session, 0, id)
    pick(t)
  end
  redis.call('HSET', P .. 't:' .. id, 'received', received, 'activity', NOW)
  local life = redis.call('PTTL', P .. 't:' .. id)
  if life > 0 then redis.call('PEXPIRE', key, life) end
  if ended then
    redis.call('HSET', P .. 't:' .. id, 'done', 1)
    finish(t, 'done', nil)
  else
    notify_task(id)
  end
  return nil
end

-- -- the fair queue ---------------------------------------------------------
-- fq:<queue>:w:<token> list of entry ids (a token's waiting requests, in order)
-- fq:<queue>:ring zset token -> score: the token served least recently first
--   (score: the sequence number of its last grant; never served: its arrival
--   as a fraction below 1, so it goes before every token served already)
-- fq:<queue>:e    hash entry -> {t: token, w: worker, d: deadline}
-- fq:<queue>:g    hash entry -> member (granted turns, until the request leaves)
-- fq:<queue>:m    hash member -> {c: capacity, s: session}; fq:<queue>:last, :seq, :turn
-- fqof:<member>   set of the queues a member serves; c:<member> lease hash (turns in use)
local DEFAULT_WEIGHT = {{DEFAULT_WEIGHT}}

local function fq(queue, part) return P .. 'fq:' .. queue .. ':' .. part end

-- The live member with the most free capacity, in proportion (ties in turn), or nil.
local function choose(queue)
  local flat = redis.call('HGETALL', fq(queue, 'm'))
  local best, tied = nil, {}
  for i = 1, #flat, 2 do
    local name, member = flat[i], cjson.decode(flat[i + 1])
    if not member.s or session_live(member.s) then
      local used = live_leases(P .. 'c:' .. name)
      if not member.c or used < member.c then
        local load = used / (member.c or DEFAULT_WEIGHT)
        if best == nil or load < best then
          best, tied = load, {name}
        elseif load == best then
          tied[#tied + 1] = name
        end
      end
    end
  end
  if #tied == 0 then return nil end
  table.sort(tied)
  local turn = redis.call('INCR', fq(queue, 'turn'))
  extend(fq(queue, 'turn'), {{LEASE_TTL}} + MARGIN)
  return tied[(turn % #tied) + 1]
end

local function grant(queue, entry, e, member)
  redis.call('HSET', P .. 'c:' .. member, entry, e.w)
  extend(P .. 'c:' .. member, {{LEASE_TTL}})
  redis.call('HSET', fq(queue, 'g'), entry, member)
  extend(fq(queue, 'g'), e.d - NOW + MARGIN + {{LEASE_TTL}})
  redis.call('PUBLISH', P .. 'w:' .. e.w, 'q:' .. entry)
end

local function drop_entry(queue, entry)
  redis.call('HDEL', fq(queue, 'e'), entry)
  redis.call('HDEL', P .. 'n:' .. queue, entry)
end

-- Grant waiting entries while a member has room: the least recently served
-- token first, in arrival order within a token. Entries of dead workers, and
-- past their deadline, are dropped on the way (their waiters see a timeout).
local function dispatch(queue)
  local ring = fq(queue, 'ring')
  for _ = 1, 10000 do
    local token = redis.call('ZRANGE', ring, 0, 0)[1]
    if not token then return end
    local list = fq(queue, 'w:' .. token)
    local entry = redis.call('LINDEX', list, 0)
    if not entry then
      redis.call('ZREM', ring, token)
    else
      local data = redis.call('HGET', fq(queue, 'e'), entry)
      local e = data and cjson.decode(data)
      if not e or not alive(e.w) or NOW >= e.d then
        redis.call('LPOP', list)
        drop_entry(queue, entry)
      else
        local member = choose(queue)
        if not member then return end
        redis.call('LPOP', list)
        grant(queue, entry, e, member)
        local seq = redis.call('INCR', fq(queue, 'seq'))
        redis.call('HSET', fq(queue, 'last'), token, seq)
        for _, part in ipairs({'seq', 'last'}) do extend(fq(queue, part), {{LEASE_TTL}} + MARGIN) end
        if redis.call('LLEN', list) > 0 then redis.call('ZADD', ring, seq, token) end
      end
      if redis.call('LLEN', list) == 0 then redis.call('ZREM', ring, token) end
    end
  end
end

-- 1 + the entries served before this one: tokens take turns, so every token
-- ahead in turn serves up to k + 1 of its own first, every one behind up to k.
local function position(queue, token, entry)
  local k = redis.call('LPOS', fq(queue, 'w:' .. token), entry)
  if not k then return 0 end
  local ahead, mine = k, true
  for _, other in ipairs(redis.call('ZRANGE', fq(queue, 'ring'), 0, -1)) do
    if other == token then
      mine = false
    else
      ahead = ahead + math.min(redis.call('LLEN', fq(queue, 'w:' .. other)),
                               k + (mine and 1 or 0))
    end
  end
  return ahead + 1
end

-- A poll is no longer held; the session stays live for SESSION_LIVENESS from
-- now, unless it was dropped meanwhile (then false).
local function end_poll(sid, lease, started)
  redis.call('HDEL', P .. 'ph:' .. sid, lease)
  redis.call('ZREM', P .. 'g:polls', lease)
  local dropped = redis.call('GET', P .. 'x:' .. sid)
  if dropped and tonumber(dropped) >= started then return false end
  session_set(sid, 'polled', NOW, 'signed', NOW)
  if polls_held(sid) == 0 then redis.call('ZADD', P .. 'g:live', NOW + LIVENESS, sid) end
  return true
end

-- A request lets go of its task: its lease no longer counts at the LLM or the
-- task. The last waiter of an unfinished task cancels it; the last of any task
-- leaves only its tombstone. True when this was the last waiting request.
local function release(id, lease, llm)
  redis.call('HDEL', P .. 'n:' .. llm, lease)
  if redis.call('HDEL', P .. 'h:' .. id, lease) == 0 then return false end
  if live_leases(P .. 'h:' .. id) > 0 then return false end
  local t = load(id)
  if t then
    if t.share ~= '' and redis.call('GET', P .. 'sh:' .. t.share) == id then
      redis.call('DEL', P .. 'sh:' .. t.share)
    end
    finish(t, 'cancelled', err(410, 'client_gone', 'The client went away'))
    redis.call('HDEL', P .. 't:' .. id, 'payload', 'outcome')
    redis.call('PEXPIRE', P .. 't:' .. id, TOMBSTONE_MS)
  end
  redis.call('DEL', P .. 'h:' .. id, P .. 'c:' .. id)
  return true
end

-- Leases (lease -> worker) counted against `limit`; false when full.
local function take_lease(key, lease, limit, ttl)
  if live_leases(key) >= limit then return false end
  redis.call('HSET', key, lease, WORKER)
  extend(key, ttl)
  return true
end

-- ---------------------------------------------------------------------------
