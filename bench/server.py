"""The processes a bench run needs: the fake upstream and Switchboard itself
(gunicorn + gevent: one worker on a temp SQLite file and the memory bus, or
several on PostgreSQL and Redis; see tests/support/live.py)."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.support.live import REPO_ROOT, LiveServer, free_port, start_server


def cpu_seconds(pids) -> float | None:
    """User + system CPU time of these processes so far (Linux /proc), or None."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (gunicorn's workers), Linux only."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        children = []
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        return children
    except OSError:
        return []


class FakeUpstream:
    """`python -m bench.fake_upstream` in its own process."""

    def __init__(self, delay: float = 0.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fake_upstream", "--port", str(self.port),
             "--delay", str(delay)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the fake upstream did not start: {line!r}")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


class BenchContext:
    """What scenarios share: a work directory, the fake upstream, and the
    Switchboards started on first use: `memory` (one worker, SQLite, the
    in-memory bus) and `redis` (WEB_CONCURRENCY workers on `scale_out_db` and
    Redis: the scale-out configuration)."""

    def __init__(self, server_env: dict | None = None, scale_out_db: str = "postgres",
                 workers: int = 2):
        self._tmp = tempfile.TemporaryDirectory(prefix="switchboard-bench-")
        self.workdir = Path(self._tmp.name)
        self.server_env = server_env or {}
        self.scale_out_db = scale_out_db
        self.workers = workers
        self.upstream = FakeUpstream()
        self._switchboards: dict[str, LiveServer] = {}
        self.http = requests.Session()
        self.http.trust_env = False

    def switchboard(self, bus: str = "memory", instrument: bool = True) -> LiveServer:
        """The Switchboard of `bus`; with `instrument` False, another one
        with SWITCHBOARD_INSTRUMENT=false (no metrics, usage, request ids or
        access lines), to measure what they cost."""
        key = (bus, instrument)
        if key not in self._switchboards:
            env = dict(self.server_env)
            if not instrument:
                env["SWITCHBOARD_INSTRUMENT"] = "false"
            if bus == "memory":
                server = start_server(self.workdir, env, db="sqlite", bus="memory")
            else:
                server = start_server(self.workdir,
                                      {**env, "WEB_CONCURRENCY": str(self.workers)},
                                      db=self.scale_out_db, bus="redis")
            self._switchboards[key] = server
        return self._switchboards[key]

    def register_public_llm(self, name: str, url: str, bus: str = "memory",
                            instrument: bool = True, **fields) -> None:
        server = self.switchboard(bus, instrument)
        response = self.http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"),
                                  json={"name": name, "model": "bench-model", "url": url,
                                        "api_key": "sk-bench", **fields}, timeout=10)
        response.raise_for_status()

    def close(self):
        self.http.close()
        for server in self._switchboards.values():
            server.stop()
            server.clean_up()
        self.upstream.stop()
        time.sleep(0.05)
        self._tmp.cleanup()
