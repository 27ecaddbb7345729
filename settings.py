"""Every setting and its default, in one place.

The environment overrides them (`SWITCHBOARD_<NAME>`, plus the conventional
`DATABASE_URL`, `REDIS_URL`, `SECRET_KEY`); tests pass a dict to `create_app`.
Durations are seconds.
"""
import logging
import os
import secrets
import stat
import tempfile

from cryptography.fernet import Fernet

log = logging.getLogger(__name__)

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
    # Delivery (DESIGN.md): redelivery of unacknowledged tasks, lost
    # publishers, the poll cap.
    "TASK_ACK_TIMEOUT": 10.0,
    "TASK_MAX_ATTEMPTS": 2,
    "PUBLISHER_LOST_TIMEOUT": 60.0,
    "MAX_POLLS_PER_SESSION": 4,
    # The fair queue (DESIGN.md, "Pools, capacity and the fair queue").
    "QUEUE_TIMEOUT": 60.0,
    "MAX_QUEUED_PER_TOKEN": 32,
    # Unread chunks of one stream before its publisher is held back (429).
    "MAX_BUFFERED_CHUNKS": 10_000,
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
    "DATABASE_POOL_SIZE": 20,
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
    # Comma-separated origins a browser may call /v1 and /api/v1 from; none by default.
    "CORS_ORIGINS": "",
    # Operations (DESIGN.md): metrics, usage counting and request ids
    # (INSTRUMENT false turns all three off: a bench setting); one access
    # line per request (ACCESS_LOG); text or json log lines (read by
    # gunicorn.conf.py); usage kept in buckets of this many seconds, written
    # every USAGE_FLUSH_INTERVAL from a buffer of at most USAGE_MAX_PENDING
    # (bucket, token, LLM) rows per worker.
    "INSTRUMENT": True,
    "ACCESS_LOG": True,
    "LOG_FORMAT": "text",
    "USAGE_BUCKET_SECONDS": 3600,
    "USAGE_FLUSH_INTERVAL": 2.0,
    "USAGE_MAX_PENDING": 10_000,
    # How long a worker trusts what it read of a token (its caller) and of a
    # publisher session (its owner) before reading it again: a token revoked
    # with `flask tokens revoke` is refused by every worker within this
    # (0: every request reads the database).
    "AUTH_CACHE_TTL": 1.0,
    "REDIS_URL": None,
    # The status page's sign-in cookie (Flask's session, signed with
    # SECRET_KEY): sent back to /status only, never readable by scripts or
    # sent from another site. Behind TLS, set SWITCHBOARD_SESSION_COOKIE_SECURE=true.
    "SESSION_COOKIE_NAME": "switchboard_status",
    "SESSION_COOKIE_PATH": "/status",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Strict",
    "SESSION_COOKIE_SECURE": False,
    "PERMANENT_SESSION_LIFETIME": 8 * 3600,
    # Every Redis key the bus makes starts with this (several deployments, or
    # test runs, may share one Redis).
    "REDIS_PREFIX": "switchboard:",
    # Redis connections per worker process (one of them is the pub/sub
    # listener); a request waits at most 2 s for a free one, then 503.
    "REDIS_MAX_CONNECTIONS": 64,
}

# Each secret: the environment variable that sets it, the config key it
# lands in, and how to make a new one (into the instance folder) when unset.
SECRETS = (
    ("SECRET_KEY", "SECRET_KEY", lambda: secrets.token_hex(32)),        # Flask's: signs cookies
    ("SWITCHBOARD_SECRET_KEY", "API_KEY_SECRET",                        # encrypts upstream keys
     lambda: Fernet.generate_key().decode()),
)


def load(app, overrides=None):
    """Fill `app.config` from the defaults, the environment, then `overrides`;
    then the secrets still unset from the instance folder (generated there on
    first start)."""
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("SWITCHBOARD")
    # from_prefixed_env reads SWITCHBOARD_SECRET_KEY as Flask's SECRET_KEY:
    # they are two keys with two jobs.
    app.config.pop("SECRET_KEY", None)
    for env_name, key, _ in SECRETS:
        if os.environ.get(env_name):
            app.config[key] = os.environ[env_name]
    database_url = os.environ.get("DATABASE_URL")
    if database_url:
        app.config["SQLALCHEMY_DATABASE_URI"] = normalize_database_url(database_url)
    else:
        make_private_folder(app.instance_path)
        path = os.path.join(app.instance_path, "switchboard.db")
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
    if os.environ.get("REDIS_URL"):
        app.config["REDIS_URL"] = os.environ["REDIS_URL"]
    if overrides:
        app.config.update(overrides)
    # The secrets still unset, by name, with the file each was read from.
    app.config["SECRETS_FROM_INSTANCE"] = {}
    for env_name, key, generate in SECRETS:
        if not app.config.get(key):
            make_private_folder(app.instance_path)
            app.config[key] = instance_secret(app.instance_path, env_name, generate)
            app.config["SECRETS_FROM_INSTANCE"][env_name] = os.path.join(app.instance_path,
                                                                         env_name)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_BODY_BYTES"])


def flag(config, key) -> bool:
    """A boolean setting: true/false, 1/0, yes/no, on/off (any case)."""
    value = config.get(key)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def cors_origins(config) -> list[str]:
    """SWITCHBOARD_CORS_ORIGINS as a list: comma-separated (or a JSON list)."""
    raw = config.get("CORS_ORIGINS") or ""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return [origin.strip().rstrip("/") for origin in items if origin.strip()]


def normalize_database_url(url):
    """Heroku-style `postgres://` URLs name the psycopg 3 driver explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_private_folder(path):
    """Create `path` readable by its owner only (0700), or tighten it to that."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o700)
    except OSError:  # not ours to change: leave it as the operator set it
        pass


def instance_secret(folder, name, generate) -> str:
    """The secret in `folder/name`, generated into it (mode 0600) first if
    the file is missing. Safe when several processes start at once: each
    writes a complete file of its own and links it into place; the first link
    wins and everyone reads that one."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        fd, draft = tempfile.mkstemp(dir=folder, prefix=f".{name}.")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(generate() + "\n")
            os.link(draft, path)
            log.warning("%s is not set: generated one into %s (keep that file; with several "
                        "hosts, set %s instead, the same on every host)", name, path, name)
        except FileExistsError:
            pass  # another process generated it first
        finally:
            os.unlink(draft)
    with open(path, encoding="utf-8") as f:
        value = f.read().strip()
    if not value:
        raise RuntimeError(f"{path} is empty: delete it (a new {name} is then generated) "
                           f"or set {name}")
    return value
