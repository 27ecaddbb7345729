-- is_live(session) -> 1 while a poll is held (on a live worker), or ended (or the
-- session registered) less than SESSION_LIVENESS ago.
return session_live(ARG(1)) and 1 or 0
