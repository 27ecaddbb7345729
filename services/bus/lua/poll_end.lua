-- poll_end(session, lease, started_at): the poll is no longer held (`end_poll`).
return end_poll(ARG(1), ARG(2), tonumber(ARG(3))) and 1 or 0
