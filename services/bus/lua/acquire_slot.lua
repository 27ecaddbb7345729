-- acquire_slot(llm, lease, limit, ttl, routes_version) -> 1 | 0 (full) | -1:
-- public LLMs' rows changed since `routes_version` (routes_version.lua; '': no check)
if ARG(5) ~= '' and ARG(5) ~= 'v' .. (redis.call('GET', P .. 'routes') or '') then return -1 end
return take_lease(P .. 'n:' .. ARG(1), ARG(2), tonumber(ARG(3)), tonumber(ARG(4))) and 1 or 0
