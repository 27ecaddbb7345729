-- heartbeat(lease_ttl, llm...): this worker is alive (the prelude renewed it);
-- forget dead workers; keep the lease hashes of LLMs it holds leases on.
redis.call('ZREMRANGEBYSCORE', P .. 'workers', '-inf', NOW)
local ttl = tonumber(ARG(1))
for i = 2, NARGS() do extend(P .. 'n:' .. ARG(i), ttl) end
return 1
