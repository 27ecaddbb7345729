-- acquire_slot(llm, lease, limit, ttl) -> 1 | 0 (full)
return take_lease(P .. 'n:' .. ARG(1), ARG(2), tonumber(ARG(3)), tonumber(ARG(4))) and 1 or 0
