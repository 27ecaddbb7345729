-- seen(session): a sign of life (a heartbeat): the publisher is not lost.
session_set(ARG(1), 'signed', NOW)
return 1
