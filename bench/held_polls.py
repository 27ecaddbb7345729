"""Thousands of publishers long-polling one gunicorn gevent worker: its memory,
and how fast a task reaches its publisher while every poll is held.

    python -m bench.held_polls               # 5,000 sessions, 200 probe requests
    python -m bench.held_polls --sessions 1000 --probes 50
    python -m bench.held_polls --bus redis   # two workers on PostgreSQL + Redis

Each of N publisher sessions registers one virtual LLM and keeps one poll held
(re-polling as soon as a poll returns). Once all are held it reads the
worker's RSS, then sends probe requests one at a time to random LLMs and
times each from the client's send to its publisher receiving the task. Bounded:
loopback only, a fixed number of probes, a deadline on every phase.

Targets (2-core machine): 5,000 held polls at <= 400 MB RSS; a task reaches
its publisher in <= 50 ms p99.
"""
import argparse
import asyncio
import random
import statistics
import sys
import time

import aiohttp
import orjson

from bench.server import BenchContext, child_pids, cpu_seconds

POLL_WAIT = 25
PHASE_TIMEOUT = 120


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Fleet:
    def __init__(self, http, server):
        self.http = http
        self.api = f"{server.url}/api/v1"
        self.publisher = {**server.headers("publisher"), "Content-Type": "application/json"}
        self.client = {**server.headers("client"), "Content-Type": "application/json"}
        self.sessions = []
        self.held = 0
        self.received = {}  # probe id -> time its task reached the publisher

    async def register(self, n):
        body = {"llms": [{"name": f"held-{n}", "model": "m"}]}
        async with self.http.post(f"{self.api}/publishers/register", data=orjson.dumps(body),
                                  headers=self.publisher) as response:
            response.raise_for_status()
            return (await response.json())["session_id"]

    async def poll_forever(self, session_id):
        url = f"{self.api}/publishers/{session_id}/tasks?wait={POLL_WAIT}"
        while True:
            self.held += 1
            try:
                async with self.http.get(url, headers=self.publisher) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"poll answered {response.status}: {body[:300]!r}")
                    tasks = orjson.loads(body)["tasks"]
            finally:
                self.held -= 1
            now = time.perf_counter()
            for task in tasks:
                if task["kind"] != "infer":
                    continue
                self.received[task["body"]["messages"][0]["content"]] = now
                result = {"status": 200, "body": {"ok": True}}
                async with self.http.post(f"{self.api}/tasks/{task['task_id']}/result",
                                          data=orjson.dumps(result),
                                          headers=self.publisher) as answer:
                    await answer.read()

    async def probe(self, n, index):
        body = {"messages": [{"role": "user", "content": str(index)}]}
        sent = time.perf_counter()
        async with self.http.post(f"{self.api}/llms/held-{n}/infer", data=orjson.dumps(body),
                                  headers=self.client) as response:
            await response.read()
            assert response.status == 200, (response.status, await response.text())
        return self.received[str(index)] - sent


async def settle(pids, quiet=0.05, timeout=PHASE_TIMEOUT):
    """Until the workers are idle (under `quiet` of a core over a second): every
    poll sent has been taken up by the bus."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pids)
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        now = cpu_seconds(pids)
        if now - before < quiet:
            return
        before = now


async def run(args, server, worker_pids):
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=POLL_WAIT + 15, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        fleet = Fleet(http, server)
        rss_idle = sum(rss_mb(pid) for pid in worker_pids)
        started = time.perf_counter()
        for batch in range(0, args.sessions, 100):
            fleet.sessions += await asyncio.gather(*(
                fleet.register(n) for n in range(batch, min(batch + 100, args.sessions))))
        registered = time.perf_counter() - started
        pollers = []
        for batch in range(0, args.sessions, 500):  # stay under the listen backlog
            pollers += [asyncio.create_task(fleet.poll_forever(sid))
                        for sid in fleet.sessions[batch:batch + 500]]
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + PHASE_TIMEOUT
        while fleet.held < args.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await settle(worker_pids)  # every poll has reached the bus
        rss_held = sum(rss_mb(pid) for pid in worker_pids)
        delays = []
        for index in range(args.probes):
            delays.append(await asyncio.wait_for(
                fleet.probe(random.randrange(args.sessions), index), 30))
        for poller in pollers:
            poller.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
    return registered, rss_idle, rss_held, delays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--bus", choices=["memory", "redis"], default="memory",
                        help="memory: one worker on SQLite; redis: --workers workers on "
                             "PostgreSQL + Redis")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    ctx = BenchContext({"SWITCHBOARD_POLL_WAIT_MAX": str(POLL_WAIT)}, workers=args.workers)
    try:
        server = ctx.switchboard(args.bus)
        workers = child_pids(server.process.pid)
        registered, rss_idle, rss_held, delays = asyncio.run(run(args, server, workers))
    finally:
        ctx.close()
    quantiles = statistics.quantiles(delays, n=100, method="inclusive")
    p50, p99 = quantiles[49] * 1000, quantiles[98] * 1000
    where = ("one gunicorn gevent worker, memory bus" if args.bus == "memory" else
             f"{len(workers)} gunicorn gevent workers, PostgreSQL + Redis")
    print(f"held polls: {args.sessions} sessions (registered in {registered:.1f} s), {where}")
    print(f"worker RSS: {rss_idle:.0f} MB idle, {rss_held:.0f} MB with every poll held "
          f"(all workers; target <= 400 MB) {'OK' if rss_held <= 400 else 'MISSED'}")
    print(f"task reaches its publisher: p50 {p50:.1f} ms, p99 {p99:.1f} ms over "
          f"{len(delays)} probes (target p99 <= 50 ms) {'OK' if p99 <= 50 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
