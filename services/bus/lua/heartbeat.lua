-- heartbeat(lease_ttl, llm...): this worker is alive (the prelude renewed it);
-- forget dead workers; keep the lease hashes of LLMs it holds leases on; and
-- tell its own listener, which reconnects when it hears nothing for a while.
redis.call('ZREMRANGEBYSCORE', P .. 'workers', '-inf', NOW)
redis.call('PUBLISH', P .. 'w:' .. WORKER, 'beat')
local ttl = tonumber(ARG(1))
for i = 2, NARGS() do extend(P .. 'n:' .. ARG(i), ttl) end
return 1
