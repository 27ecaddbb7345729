"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app` (see Procfile).

One gevent worker process holds thousands of long-polls and waiting requests
at once. The in-memory task bus lives inside that process, so there must be
exactly one worker unless REDIS_URL selects the Redis bus.
"""
import logging
import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "1")) if os.environ.get("REDIS_URL") else 1
# Held long-polls and waiting clients are connections: size for thousands.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
# Behind nginx, keep idle upstream connections a while.
keepalive = 75
timeout = 30
graceful_timeout = 30
accesslog = os.environ.get("ACCESS_LOG") or None
loglevel = os.environ.get("LOG_LEVEL", "info")

# The app's own loggers (`logging.getLogger(__name__)`) go to stderr with
# timestamps; gunicorn keeps its own handlers for its lines.
logging.basicConfig(level=loglevel.upper(),
                    format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                    datefmt="[%Y-%m-%d %H:%M:%S %z]")


def when_ready(server):
    if os.environ.get("REDIS_URL"):
        server.log.info("task bus: redis; %d worker processes", workers)
    else:
        server.log.info("task bus: in-memory; running exactly one worker process "
                        "(set REDIS_URL to scale out)")
