-- push_chunks(task_id, owner, seq, done, max_buffered, chunk...) -> {'ok'} | {'err', error}
-- seq '' means "append"; a batch that only repeats chunks already received is
-- accepted, even after the stream ended. '[DONE]' or done ends the stream.
local id, owner, seq, done, max_buffered = ARG(1), ARG(2), ARG(3), ARG(4) == '1', tonumber(ARG(5))
local first_chunk, count = 6, NARGS() - 5
local t, e = find(id, owner)
if e then return {'err', e} end
refresh(t)
local received = tonumber(t.received)
if seq ~= '' and tonumber(seq) + count <= received and (t.done == '1' or not done)
    and (OPEN[t.state] or t.state == 'done') then
  signed(t)
  return {'ok'}  -- a retry of what we have; but a stopped task says so (410)
end
e = check_open(t)
if e then return {'err', e} end
if t.kind ~= 'infer' or t.streaming ~= '1' then
  return {'err', err(409, 'not_a_stream', "Task '" .. id .. "' is not a stream: post its result")}
end
local start = seq == '' and received or tonumber(seq)
if start > received then
  return {'err', err(409, 'seq_gap', 'Chunk seq ' .. seq .. ' leaves a gap: expected ' .. received,
                     {expected_seq = received})}
end
local key = P .. 'c:' .. id
if redis.call('LLEN', key) + count > max_buffered then
  return {'err', err(429, 'too_many_pending', 'The client is not reading the stream fast enough',
                     nil, {['Retry-After'] = '1'})}
end
signed(t)
local ended = false
for i = received - start + 1, count do
  local data = ARG(first_chunk + i - 1)
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
return {'ok'}
