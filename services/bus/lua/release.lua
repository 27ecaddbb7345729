-- release(task_id, lease, llm) -> 1 when this was the task's last waiting request.
-- Idempotent: a lease released twice, or never taken, changes nothing.
local id, lease, llm = ARG(1), ARG(2), ARG(3)
redis.call('HDEL', P .. 'n:' .. llm, lease)
if redis.call('HDEL', P .. 'h:' .. id, lease) == 0 then return 0 end
if live_leases(P .. 'h:' .. id) > 0 then return 0 end
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
return 1
