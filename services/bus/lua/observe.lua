-- observe(task_id, idle_timeout, idle_label, read_chunks, lease)
--   -> {state, stream_done, outcome, error, wake_at, activity, llm, chunk...}
-- What a waiting client needs: moves the task on when its time has come
-- (`advance`, or for a stream the idle timeout); with read_chunks, takes the
-- unread chunks. wake_at is when time next moves it. With a lease, a task
-- found finished is released for it too (`release`, in the same step).
local id, idle, idle_label, read_chunks = ARG(1), tonumber(ARG(2)), ARG(3), ARG(4) == '1'
local lease = ARG(5) or ''
local t = load(id)
if not t then return {'missing'} end
advance(t)
if idle and t.state == 'picked' and NOW - tonumber(t.activity) >= idle then
  finish(t, 'expired', err(504, 'stream_idle_timeout', "No stream data from the publisher of LLM '" ..
    t.llm .. "' for " .. idle_label .. ' s'))
end
local outcome, error_json = unpack(redis.call('HMGET', P .. 't:' .. id, 'outcome', 'error'))
local next_move = OPEN[t.state] and tostring(wake_at(t)) or ''
local reply = {t.state, t.done, outcome or '', error_json or '', next_move, t.activity or '',
               t.llm}
if lease ~= '' and not OPEN[t.state] then release(id, lease, t.llm) end
if read_chunks then
  local key = P .. 'c:' .. id
  local chunks = redis.call('LRANGE', key, 0, -1)
  if #chunks > 0 then
    redis.call('LTRIM', key, #chunks, -1)
    for _, chunk in ipairs(chunks) do reply[#reply + 1] = chunk end
  end
end
return reply
