-- heartbeat(lease_ttl, key...): this worker is alive (the prelude renewed it);
-- forget dead workers; keep the lease hashes it holds leases in (`n:<llm>`,
-- `c:<member>`); and
-- tell its own listener, which reconnects when it hears nothing for a while.
redis.call('ZREMRANGEBYSCORE', P .. 'workers', '-inf', NOW)
redis.call('PUBLISH', P .. 'w:' .. WORKER, 'beat')
local ttl = tonumber(ARG(1))
for i = 2, NARGS() do extend(P .. ARG(i), ttl) end
return 1
