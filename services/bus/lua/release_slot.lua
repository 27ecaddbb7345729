-- release_slot(llm, lease)
return redis.call('HDEL', P .. 'n:' .. ARG(1), ARG(2))
