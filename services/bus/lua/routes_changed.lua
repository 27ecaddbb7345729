-- routes_changed(ttl): a public LLM's row changed, or is about to: move the
-- version that workers check what they remember against. A counter gone (its
-- TTL, a Redis restarted empty) starts again from Redis's clock, in
-- microseconds: past any value it held.
local key = P .. 'routes'
if redis.call('EXISTS', key) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', key, now[1] .. string.format('%06d', tonumber(now[2])))
end
redis.call('INCR', key)
redis.call('EXPIRE', key, tonumber(ARG(1)))
return 1
