"""The stack the suite runs on, chosen by the environment:

    SWITCHBOARD_TEST_DB=sqlite|postgres   (default sqlite)
    SWITCHBOARD_TEST_BUS=memory|redis     (default memory)

`make test` runs the suite twice: SQLite + memory bus, then PostgreSQL +
Redis (live servers with two gunicorn workers). Every test gets a database of
its own (a copy of a migrated template: a file, or `CREATE DATABASE ...
TEMPLATE`) and, on Redis, a key prefix of its own; at teardown every key under
it must carry a TTL (DESIGN.md: nothing is left behind), then the keys go.

PostgreSQL and Redis are reached at SWITCHBOARD_TEST_PG_URL (the maintenance
database; default postgresql://postgres@127.0.0.1:5432/postgres) and
SWITCHBOARD_TEST_REDIS_URL (default redis://127.0.0.1:6379/0).
"""
import itertools
import os
import shutil
import uuid
from pathlib import Path

DB = os.environ.get("SWITCHBOARD_TEST_DB", "sqlite")
BUS = os.environ.get("SWITCHBOARD_TEST_BUS", "memory")
PG_URL = os.environ.get("SWITCHBOARD_TEST_PG_URL",
                        "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Live servers on Redis run several workers: requests and polls land on any.
LIVE_WORKERS = 2

if DB not in ("sqlite", "postgres") or BUS not in ("memory", "redis"):
    raise RuntimeError(f"unknown test stack {DB}+{BUS}: SWITCHBOARD_TEST_DB is sqlite|postgres, "
                       f"SWITCHBOARD_TEST_BUS is memory|redis")

RUN = uuid.uuid4().hex[:8]  # this run's databases and keys, apart from any other run's
_names = itertools.count(1)


def unique_name(tag: str = "t") -> str:
    return f"sbt_{RUN}_{tag}{next(_names)}"


def sqlalchemy_url(url: str) -> str:
    import settings

    return settings.normalize_database_url(url)


# -- databases ------------------------------------------------------------------

def _pg_admin():
    import psycopg

    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)


def _pg_url(name: str) -> str:
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


def empty_database(directory: Path, db: str | None = None) -> str:
    """The URL (as DATABASE_URL takes it) of a new, empty database (of `db`,
    default this run's)."""
    if (db or DB) == "sqlite":
        return f"sqlite:///{Path(directory) / (unique_name('db') + '.db')}"
    name = unique_name("db")
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _pg_url(name)


def copy_database(template_url: str, directory: Path) -> str:
    """A new database holding what `template_url` holds (nobody may be connected to it)."""
    if template_url.startswith("sqlite"):
        path = Path(directory) / (unique_name("db") + ".db")
        shutil.copy(template_url.removeprefix("sqlite:///"), path)
        return f"sqlite:///{path}"
    name = unique_name("db")
    template = template_url.rpartition("/")[2]
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return _pg_url(name)


def drop_database(url: str) -> None:
    if url.startswith("sqlite"):
        return  # the file goes with pytest's tmp_path
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')


def drop_run_databases() -> None:
    """Every database this run made (the end of the session)."""
    if DB == "sqlite":
        return
    with _pg_admin() as conn:
        names = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"sbt\\_{RUN}\\_%",))]
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the bus --------------------------------------------------------------------

def bus_settings(bus: str | None = None) -> dict:
    """App config for a bus (default this run's): a Redis key prefix of its
    own, or nothing for the memory bus."""
    if (bus or BUS) == "memory":
        return {}
    return {"REDIS_URL": REDIS_URL, "REDIS_PREFIX": f"{unique_name('r')}:"}


def bus_environment(settings: dict) -> dict:
    """The same, as a server's environment."""
    env = {}
    if "REDIS_URL" in settings:
        env["REDIS_URL"] = settings["REDIS_URL"]
        env["SWITCHBOARD_REDIS_PREFIX"] = settings["REDIS_PREFIX"]
        env["WEB_CONCURRENCY"] = str(LIVE_WORKERS)
    return env


def redis_keys(prefix: str) -> dict:
    """{key: ttl in ms} of every key under `prefix` (-1: no TTL)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return {key: client.pttl(key) for key in client.scan_iter(match=prefix + "*", count=1000)}
    finally:
        client.close()


def delete_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def keys_without_ttl(prefix: str) -> list[str]:
    return sorted(key for key, ttl in redis_keys(prefix).items() if ttl == -1)


def only_on(*, bus: str | None = None, db: str | None = None):
    """Mark a test about one stack's own behaviour (one worker on the memory bus,
    say); `make test` runs it in that stack's half."""
    import pytest

    wanted = [value for value in (db, bus) if value]
    return pytest.mark.skipif((bus or BUS) != BUS or (db or DB) != DB,
                              reason=f"runs in the {'+'.join(wanted)} half of `make test`")
