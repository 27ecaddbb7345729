"""gunicorn settings: `gunicorn -c gunicorn.conf.py wsgi:app` (see Procfile).

One gevent worker process holds thousands of long-polls and waiting requests
at once. The in-memory task bus lives inside that process, so there must be
exactly one worker unless REDIS_URL selects the Redis bus.
"""
import os
import shutil
import tempfile

from services import logs

# `make run` passes HOST=127.0.0.1 unless HOST is set; the Procfile's platform
# routes to 0.0.0.0.
HOST, PORT = os.environ.get("HOST", "0.0.0.0"), os.environ.get("PORT", "8000")
bind = f"{HOST}:{PORT}"
# gunicorn's control socket (for `gunicornc`) is one path per user by default:
# a second instance would take it over, and delete it when it stops. One per
# instance folder and port instead (the folder is private: settings.py).
INSTANCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance")
os.makedirs(INSTANCE, mode=0o700, exist_ok=True)
control_socket = os.path.join(INSTANCE, f"gunicorn-{PORT}.ctl")
worker_class = "gevent"
# With Redis any worker serves any request: one per core unless WEB_CONCURRENCY says.
workers = (int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
           if os.environ.get("REDIS_URL") else 1)
# Several workers accepting from one socket do not share the connections
# evenly: the busiest, awake already, wins most races to accept, and a
# keep-alive connection (nginx keeps its own) stays with the worker that took
# it. With SO_REUSEPORT each worker listens on its own socket and the kernel
# spreads new connections over them.
reuse_port = bool(os.environ.get("REDIS_URL"))
# Held long-polls and waiting clients are connections: size for thousands.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
# Behind nginx, keep idle upstream connections a while.
keepalive = 75
timeout = 30
graceful_timeout = 30
accesslog = os.environ.get("ACCESS_LOG") or None
loglevel = os.environ.get("LOG_LEVEL", "info")

# The app's own loggers (`logging.getLogger(__name__)`) and gunicorn's go to
# stderr, as text or one JSON object per line (SWITCHBOARD_LOG_FORMAT=json),
# each with the request id of the request it was written for. The app writes
# one access line per request itself (SWITCHBOARD_ACCESS_LOG); gunicorn's own
# access log stays off unless ACCESS_LOG names a file.
logs.configure(os.environ.get("SWITCHBOARD_LOG_FORMAT", "text"), loglevel)
logger_class = logs.GunicornLogger

# /metrics adds up every worker's counters: prometheus-client's multiprocess
# mode, one directory per gunicorn instance (emptied at start), set before
# any worker imports the app.
# (A reload reads this file again: the folder made at start is kept, and
# removed when gunicorn exits.)
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="switchboard-metrics-")
    os.environ["_SWITCHBOARD_OWN_METRICS_DIR"] = "1"


def nworkers_changed(server, new_value, old_value):
    # The in-memory bus lives inside one process: a second worker would see
    # polls and requests the first one holds as unknown. This runs at start,
    # on reload (HUP) and on TTIN alike.
    if not os.environ.get("REDIS_URL") and new_value > 1:
        server.log.warning("the in-memory task bus needs exactly one worker process: running 1, "
                           "not %d (set REDIS_URL to scale out)", new_value)
        # A reload spawns `cfg.workers` new workers (from --workers, which
        # beats this file) before it trims them to num_workers: both say 1.
        server.cfg.set("workers", 1)
        server.num_workers = 1


def when_ready(server):
    if os.environ.get("REDIS_URL"):
        # Each worker binds its own socket (reuse_port): gunicorn's own
        # "Listening at" line names none.
        server.log.info("task bus: redis; %d worker processes, listening at %s",
                        server.num_workers, ", ".join(server.cfg.bind))
    else:
        server.log.info("task bus: in-memory; running exactly one worker process "
                        "(set REDIS_URL to scale out)")


def on_starting(server):
    # Counters of a previous run must not add up with this one's.
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.unlink(os.path.join(folder, name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    # A worker that stops gracefully writes the usage it still holds.
    app = getattr(worker, "wsgi", None)
    instrumentation = getattr(app, "extensions", {}).get("instrumentation")
    if instrumentation is not None:
        instrumentation.close()


def on_exit(server):
    if os.environ.get("_SWITCHBOARD_OWN_METRICS_DIR") == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
