-- is_live(session) -> 1 while a poll is held, or ended less than SESSION_LIVENESS
-- ago, on a worker that is alive.
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', P .. 'p:' .. ARG(1), NOW, '+inf')) do
  if alive(worker) then return 1 end
end
return 0
