-- routes_version() -> where public LLMs' rows stand ('v' .. the counter)
return 'v' .. (redis.call('GET', P .. 'routes') or '')
