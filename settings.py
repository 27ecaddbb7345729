"""Every setting and its default, in one place.

The environment overrides them (`SWITCHBOARD_<NAME>`, plus the conventional
`DATABASE_URL`, `REDIS_URL`); tests pass a dict to `create_app`.
Durations are seconds.
"""
import os

DEFAULTS = {
    "POLL_WAIT_MAX": 25.0,
    "SESSION_LIVENESS": 10.0,
    "HEARTBEAT_TIMEOUT": 90.0,
    "INACTIVE_RETENTION": 14400.0,
    "TASK_PICKUP_TIMEOUT": 30.0,
    "INFER_TIMEOUT": 600.0,
    "STREAM_IDLE_TIMEOUT": 120.0,
    "WAKE_TIMEOUT": 300.0,
    "MAX_BODY_BYTES": 4 * 1024 * 1024,
    "MAX_PENDING_PER_LLM": 256,
    # Not in the contract, but tunable: SSE comment interval while a stream
    # waits, and the connect timeout towards public upstreams.
    "STREAM_KEEPALIVE": 15.0,
    "UPSTREAM_CONNECT_TIMEOUT": 5.0,
    # How long a SQLite write waits for another process's lock (gc-sweep from
    # cron, a `flask tokens` command); it stalls the gevent worker meanwhile.
    "SQLITE_BUSY_TIMEOUT": 2.0,
    # Every wait for the database is bounded; past a bound, a 503
    # (`database_busy` / `database_unavailable`) with Retry-After. Connections
    # per worker process: greenlets hold one only between their first query
    # and their commit, never while they wait on the bus or an upstream.
    "DATABASE_POOL_SIZE": 10,
    "DATABASE_MAX_OVERFLOW": 10,
    # How long a request waits for a pooled connection when all are in use
    # (whole seconds, rounded up).
    "DATABASE_POOL_TIMEOUT": 5.0,
    # PostgreSQL: connecting (psycopg's minimum is 2), a lock wait and one
    # statement, enforced by the server (0: no bound of ours, e.g. behind a
    # PgBouncer that refuses the `options` startup parameter; set them on the
    # role then).
    "DATABASE_CONNECT_TIMEOUT": 5.0,
    "DATABASE_LOCK_TIMEOUT": 2.0,
    "DATABASE_STATEMENT_TIMEOUT": 30.0,
    # The same bounds for `flask db upgrade` and `flask gc-sweep`, which
    # rewrite or scan whole tables (on SQLite, the lock bound is their busy
    # timeout).
    "MAINTENANCE_LOCK_TIMEOUT": 10.0,
    "MAINTENANCE_STATEMENT_TIMEOUT": 3600.0,
    # gc-sweep settles a chat answer still `pending` this long after its turn
    # began: its worker was killed (no live turn lasts an hour).
    "CHAT_PENDING_TIMEOUT": 3600.0,
    "REDIS_URL": None,
    # Every Redis key the bus makes starts with this (several deployments, or
    # test runs, may share one Redis).
    "REDIS_PREFIX": "switchboard:",
}


def load(app, overrides=None):
    """Fill `app.config` from the defaults, the environment, then `overrides`."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("SWITCHBOARD")
    database_url = os.environ.get("DATABASE_URL")
    if database_url:
        app.config["SQLALCHEMY_DATABASE_URI"] = normalize_database_url(database_url)
    else:
        os.makedirs(app.instance_path, exist_ok=True)
        path = os.path.join(app.instance_path, "switchboard.db")
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
    if os.environ.get("REDIS_URL"):
        app.config["REDIS_URL"] = os.environ["REDIS_URL"]
    if overrides:
        app.config.update(overrides)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_BODY_BYTES"])


def normalize_database_url(url):
    """Heroku-style `postgres://` URLs name the psycopg 3 driver explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url
