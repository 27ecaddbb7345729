-- gauges() -> {held_polls, live_sessions, redeliveries, llm, waiting, in_flight, ...}
-- Counted over every worker; an entry counts until its deadline (a task whose
-- worker died stops counting when its own deadline passes).
local reply = {}
for _, key in ipairs({'g:polls', 'g:live'}) do
  redis.call('ZREMRANGEBYSCORE', P .. key, '-inf', NOW)
  reply[#reply + 1] = redis.call('ZCARD', P .. key)
end
reply[#reply + 1] = tonumber(redis.call('GET', P .. 'g:redeliveries') or 0)
for _, llm in ipairs(redis.call('SMEMBERS', P .. 'g:llms')) do
  local counts = {}
  for _, which in ipairs({'w', 'f'}) do
    local key = P .. 'g:' .. which .. ':' .. llm
    redis.call('ZREMRANGEBYSCORE', key, '-inf', NOW)
    counts[#counts + 1] = redis.call('ZCARD', key)
  end
  if counts[1] + counts[2] == 0 then
    redis.call('SREM', P .. 'g:llms', llm)
  else
    reply[#reply + 1] = llm
    reply[#reply + 1] = counts[1]
    reply[#reply + 1] = counts[2]
  end
end
return reply
