"""`flask gc-sweep` over 100,000 virtual LLMs, on SQLite or PostgreSQL: wall
time of the real command (process start included) and of the sweep itself.

    python -m bench.gc_sweep                       # SQLite, 100,000 rows
    python -m bench.gc_sweep --rows 20000
    python -m bench.gc_sweep --postgres            # postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.gc_sweep --postgres postgresql://user@db-host/postgres

With --postgres the URL names a server and a database to connect to for
CREATE DATABASE (its maintenance database); the benchmark makes a database
of its own there (`switchboard_bench_<random>`), runs `ANALYZE` after
filling it (as autovacuum would soon), and drops it at the end.

Rows: 40% heartbeat-stale active, 10% stale hibernating, 25% inactive past the
retention, 15% fresh, 10% public. Target (2-core machine): <= 2 s.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from settings import normalize_database_url
from tests.support.live import REPO_ROOT, run_flask, server_env, venv_bin

TARGET_SECONDS = 2.0
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def populate(db_url, rows):
    from models import Llm, new_id, utcnow

    now = utcnow()
    shares = [  # (share, fields)
        (0.40, {"status": "active", "last_heartbeat_at": now - timedelta(minutes=5)}),
        (0.10, {"status": "hibernating", "last_heartbeat_at": now - timedelta(minutes=5)}),
        (0.25, {"status": "inactive", "last_heartbeat_at": now - timedelta(hours=6),
                "inactive_since": now - timedelta(hours=5)}),
        (0.15, {"status": "active", "last_heartbeat_at": now}),
        (0.10, {"status": "active", "kind": "public", "provider_session_id": None}),
    ]
    engine = sa.create_engine(normalize_database_url(db_url))
    with engine.begin() as connection:
        for index, (share, fields) in enumerate(shares):
            connection.execute(sa.insert(Llm), [
                {"id": new_id(), "name": f"row-{index}-{i}", "model": "m", "url": "",
                 "type": "openai", "tier": "fast", "description": "", "extra_config": {},
                 "version": 1, "created_at": now, "updated_at": now, "kind": "virtual",
                 "provider_session_id": "s", **fields}
                for i in range(int(rows * share))])
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(sa.text("ANALYZE"))
    engine.dispose()


@contextmanager
def sqlite_database():
    with tempfile.TemporaryDirectory(prefix="switchboard-gc-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'gc.db'}"


@contextmanager
def postgres_database(server_url):
    """A database of its own on the server `server_url` connects to; dropped after."""
    import psycopg

    name = f"switchboard_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--postgres", nargs="?", const=DEFAULT_POSTGRES, default=None,
                        metavar="URL", help="run on PostgreSQL (default server: %(const)s)")
    args = parser.parse_args(argv)
    engine = "PostgreSQL" if args.postgres else "SQLite"
    database = postgres_database(args.postgres) if args.postgres else sqlite_database()
    with database as db_url:
        env = server_env(db_url, 0)
        # The upgrade writes the modules' bytecode, as a deployed host's first
        # command does (where this bench runs, PYTHONDONTWRITEBYTECODE may be
        # set), so the sweep is timed as cron runs it there.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        run_flask(env, "db", "upgrade")
        populate(db_url, args.rows)
        timings = []
        for _ in range(2):  # the second sweep finds nothing left to do
            started = time.perf_counter()
            done = subprocess.run([str(venv_bin() / "flask"), "gc-sweep", "--json"],
                                  cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  check=True, timeout=120)
            timings.append((time.perf_counter() - started, json.loads(done.stdout)))
        started = time.perf_counter()
        subprocess.run([str(venv_bin() / "flask"), "--help"], cwd=REPO_ROOT, env=env,
                       capture_output=True, check=True, timeout=60)
        startup = time.perf_counter() - started
    (first, result), (second, again) = timings
    print(f"gc-sweep over {args.rows:,} rows on {engine}: {first:.2f} s for "
          f"`flask gc-sweep --json` (of which ~{startup:.2f} s is the flask command "
          f"starting), {second:.2f} s for the second sweep")
    print(f"first: {json.dumps(result)}")
    print(f"second: {json.dumps(again)}")
    print(f"target <= {TARGET_SECONDS:g} s: {'OK' if first <= TARGET_SECONDS else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
