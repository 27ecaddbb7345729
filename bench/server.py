"""The processes a bench run needs: the fake upstream and Switchboard itself
(gunicorn + gevent, one worker, a temp SQLite file; see tests/support/live.py)."""
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

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fake_upstream", "--port", str(self.port)],
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
    """What scenarios share: a work directory, the fake upstream, and one
    Switchboard started on first use."""

    def __init__(self, server_env: dict | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="switchboard-bench-")
        self.workdir = Path(self._tmp.name)
        self.server_env = server_env or {}
        self.upstream = FakeUpstream()
        self._switchboard: LiveServer | None = None
        self.http = requests.Session()
        self.http.trust_env = False

    def switchboard(self) -> LiveServer:
        if self._switchboard is None:
            self._switchboard = start_server(self.workdir, self.server_env)
        return self._switchboard

    def register_public_llm(self, name: str, url: str) -> None:
        server = self.switchboard()
        response = self.http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"),
                                  json={"name": name, "model": "bench-model", "url": url,
                                        "api_key": "sk-bench"}, timeout=10)
        response.raise_for_status()

    def close(self):
        self.http.close()
        if self._switchboard is not None:
            self._switchboard.stop()
        self.upstream.stop()
        time.sleep(0.05)
        self._tmp.cleanup()
