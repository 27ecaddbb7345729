"""Streams at a real model's pace: a fake backend that emits a token every
20 ms (32 tokens, ~0.66 s an answer), many streams at once, in one run:

- `direct`: the load straight to the backend;
- `floor`: through the minimal Flask + gunicorn (gevent) pass-through proxy
  of ../shared/bench/ (flask_floor_app.py, one worker): the least any relay costs;
- `relay`: through a virtual LLM: Switchboard (one gevent worker, SQLite,
  the memory bus) and the real `python -m publisher_client run` on loopback;
- `public`: the same Switchboard as a public proxy of the same backend.

    python -m bench.paced                     # 128, 16 and 1 streams; about 3 minutes
    python -m bench.paced --streams 128 --duration 10
    python -m bench.paced --profile /tmp/prof # py-spy on the relay's processes at 128

Every stream's text is checked against the backend's (a stream that lost,
doubled or reordered a token is an error). Printed per cell: throughput
(streams/s), time to the first chunk p50, and CPU per stream of the
scenario's own processes (publisher + server worker for `relay`, the server
for `public` and `floor`), each also as a ratio of the floor's in the same
run. Targets for `relay` at 128 streams (2-core machine): throughput >= 90%
of the floor's, first-chunk p50 <= the floor's + 15 ms, CPU per stream <= 3x
the floor's.
"""
import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import requests

from bench.server import child_pids, cpu_seconds
from tests.support.live import REPO_ROOT, free_port, start_server, venv_bin

TOKEN_DELAY = 0.020
TOKENS = 32
MODEL = "bench-model"
FLOOR_DIR = REPO_ROOT.parent / "shared" / "bench"
BODY = {"stream": True, "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": "Tell me about foxes."}]}


# -- the paced backend: its own process, raw asyncio ---------------------------

def _token(i: int) -> str:
    return f" t{i}"


EXPECTED_TEXT = "".join(_token(i) for i in range(TOKENS))


def _frame(payload: bytes) -> bytes:
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _chunk(i: int, tokens: int) -> bytes:
    delta = {"content": _token(i)} if i < tokens else {}
    return _frame(json.dumps({
        "id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 1700000000,
        "model": MODEL, "choices": [{"index": 0, "delta": delta,
                                     "finish_reason": "stop" if i == tokens else None}]}).encode())


class PacedBackend(asyncio.Protocol):
    """POST /v1/chat/completions streams `tokens` chunks `delay` apart (the
    first after one delay), a final chunk and [DONE]; GET /v1/models answers."""

    delay = TOKEN_DELAY
    tokens = TOKENS
    frames: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[:end + 4 + length]
            if head.startswith(b"POST"):
                self.stream()
            else:
                body = json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def stream(self):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, frame in enumerate(self.frames):  # one write a token, the last with the end
            loop.call_at(start + self.delay * (i + 1), self.write, frame)

    def write(self, data):
        if not self.transport.is_closing():
            self.transport.write(data)


def serve_backend(port: int, delay: float, tokens: int):
    PacedBackend.delay, PacedBackend.tokens = delay, tokens
    frames = [_chunk(i, tokens) for i in range(tokens)]
    frames[-1] += _chunk(tokens, tokens) + _frame(b"[DONE]") + b"0\r\n\r\n"
    PacedBackend.frames = frames

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(PacedBackend, "127.0.0.1", port, backlog=2048)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        async with server:
            await stop.wait()

    asyncio.run(main())


# -- the load --------------------------------------------------------------------

@dataclass
class Cell:
    scenario: str
    streams: int
    done: int = 0
    errors: dict = field(default_factory=dict)
    first_chunks: list = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float | None = None

    @property
    def throughput(self):
        return self.done / self.elapsed if self.elapsed else 0.0

    @property
    def ttfc_p50(self):
        return 1000 * statistics.median(self.first_chunks) if self.first_chunks else float("nan")

    @property
    def cpu_per_stream(self):
        return 1000 * self.cpu / self.done if self.cpu is not None and self.done else float("nan")


async def _load(url, headers, body, streams, duration, cell: Cell | None):
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        end = time.perf_counter() + duration

        async def one():
            sent = time.perf_counter()
            first, text, ended = None, [], False
            try:
                async with http.post(url, data=body, headers=headers) as response:
                    if response.status != 200:
                        return f"status {response.status}"
                    buffer = b""
                    async for piece in response.content.iter_any():
                        buffer += piece
                        *events, buffer = buffer.split(b"\n\n")
                        for event in events:
                            if not event.startswith(b"data: "):
                                continue
                            first = first or time.perf_counter()
                            data = event[6:]
                            if data == b"[DONE]":
                                ended = True
                                continue
                            for choice in json.loads(data).get("choices") or ():
                                text.append((choice.get("delta") or {}).get("content") or "")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return type(exc).__name__
            if not ended or "".join(text) != EXPECTED_TEXT:
                return "wrong text"
            if cell is not None:
                cell.first_chunks.append(first - sent)
            return None

        async def worker():
            while time.perf_counter() < end:
                error = await one()
                if cell is None:
                    continue
                if error is None:
                    cell.done += 1
                else:
                    cell.errors[error] = cell.errors.get(error, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        if cell is not None:
            cell.elapsed = time.perf_counter() - started


def run_cell(name, target, headers, streams, duration, warmup, pids, profile=None) -> Cell:
    url, body = target.url, json.dumps({**BODY, "model": target.model}).encode()
    if warmup:
        asyncio.run(_load(url, headers, body, streams, warmup, None))
    cell = Cell(name, streams)
    profilers = [_py_spy(pid, duration, out) for pid, out in (profile or ())]
    before = cpu_seconds(pids)
    asyncio.run(_load(url, headers, body, streams, duration, cell))
    after = cpu_seconds(pids)
    for profiler in profilers:
        profiler.wait(30)
    cell.cpu = None if None in (before, after) else after - before
    errors = sum(cell.errors.values())
    print(f"  {name:7} {streams:4d} streams: {cell.done:6d} ok {errors:4d} errors "
          f"{cell.errors if errors else ''}", file=sys.stderr, flush=True)
    return cell


@dataclass
class Target:
    url: str
    model: str


def _py_spy(pid, duration, out):
    # --gil: only what holds the interpreter, i.e. CPU, not threads blocked on sockets.
    return subprocess.Popen([str(venv_bin() / "py-spy"), "record", "--nonblocking", "--gil",
                             "-r", "100",
                             "-d", str(max(1, int(duration))), "-f", "raw", "-o", str(out),
                             "-p", str(pid)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """The frames where the process spent its samples: by self time (the
    leaf), and by total time (anywhere on the stack), most first."""
    leaves, totals, samples = {}, {}, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        samples += count
        frames = stack.split(";")
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        for frame in set(frames):
            totals[frame] = totals.get(frame, 0) + count
    lines = [f"{samples} samples; self:"]
    for ranked in (leaves, totals):
        if ranked is totals:
            lines.append("total:")
        lines += [f"  {100 * n / samples:5.1f}%  {frame}"
                  for frame, n in sorted(ranked.items(), key=lambda item: -item[1])[:top]]
    return lines


# -- the processes -----------------------------------------------------------------

class Process:
    def __init__(self, argv, env=None, cwd=REPO_ROOT, ready=None):
        self.process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})},
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, start_new_session=True)
        if ready is not None and self.process.stdout.readline().strip() != ready:
            self.stop()
            raise RuntimeError(f"{argv[:3]} did not start")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def wait_http(url, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="128,16,1",
                        help="concurrent streams per cell, comma-separated (default 128,16,1)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cell (8)")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before each (1.5)")
    parser.add_argument("--scenarios", default="direct,floor,relay,public")
    parser.add_argument("--floor-dir", type=Path, default=FLOOR_DIR,
                        help="where flask_floor_app.py is (default ../shared/bench)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a folder: py-spy the relay's server worker and publisher at the "
                             "first --streams figure, and print their top frames")
    parser.add_argument("--publisher-log", type=Path, default=None,
                        help="keep the publisher's log there")
    parser.add_argument("--serve-backend", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend is not None:
        return serve_backend(args.serve_backend, TOKEN_DELAY, TOKENS)
    streams = [int(n) for n in args.streams.split(",")]
    scenarios = args.scenarios.split(",")
    from tests.publisher_client.helpers import PublisherProcess

    tmp = tempfile.TemporaryDirectory(prefix="paced-bench-")
    workdir = Path(tmp.name)
    started = []
    try:
        port = free_port()
        backend = Process([sys.executable, "-m", "bench.paced", "--serve-backend", str(port)],
                          ready="ready")
        started.append(backend)
        backend_url = f"http://127.0.0.1:{port}/v1"
        floor_port = free_port()
        floor = Process([str(venv_bin() / "gunicorn"), "-k", "gevent", "-w", "1",
                         "--worker-connections", "2000", "-b", f"127.0.0.1:{floor_port}",
                         "--no-control-socket", "--chdir", str(args.floor_dir),
                         "flask_floor_app:app"],
                        env={"FLOOR_MODE": "proxy", "FLOOR_UPSTREAM": backend_url})
        started.append(floor)
        wait_http(f"http://127.0.0.1:{floor_port}/")
        server = start_server(workdir, db="sqlite", bus="memory")
        started.append(server)
        requests.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"), timeout=10,
                      json={"name": "paced-public", "model": MODEL, "url": backend_url,
                            "api_key": "sk-bench"}).raise_for_status()
        publisher = PublisherProcess(server, workdir, [{
            "name": "paced", "type": "openai", "url": backend_url, "model": MODEL,
            "max_concurrency": 1024}]).start()
        started.append(publisher)
        server_pids = [server.process.pid, *child_pids(server.process.pid)]
        worker = child_pids(server.process.pid)[0]
        floor_pids = [floor.process.pid, *child_pids(floor.process.pid)]
        client = server.headers("client")
        targets = {
            "direct": (Target(f"{backend_url}/chat/completions", MODEL), {}, [backend.process.pid]),
            "floor": (Target(f"http://127.0.0.1:{floor_port}/v1/chat/completions", MODEL), {},
                      floor_pids),
            "relay": (Target(f"{server.url}/v1/chat/completions", "paced"), client,
                      [*server_pids, publisher.process.pid]),
            "public": (Target(f"{server.url}/v1/chat/completions", "paced-public"), client,
                       server_pids)}
        cells = []
        for n in streams:
            for name in scenarios:
                target, headers, pids = targets[name]
                profile = None
                if args.profile and name == "relay" and n == streams[0]:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profile = [(worker, args.profile / "server.txt"),
                               (publisher.process.pid, args.profile / "publisher.txt")]
                cells.append(run_cell(name, target, headers, n, args.duration, args.warmup,
                                      pids, profile))
    finally:
        for process in reversed(started):
            process.stop()
        if args.publisher_log and (workdir / "publisher.log").exists():
            args.publisher_log.write_bytes((workdir / "publisher.log").read_bytes())
        time.sleep(0.05)
        tmp.cleanup()
    report(cells, streams)
    if args.profile:
        for name in ("server", "publisher"):
            path = args.profile / f"{name}.txt"
            if path.exists():
                print(f"\npy-spy --gil, {name}:")
                print("\n".join("  " + line for line in summarize_profile(path)))
    return 1 if any(cell.errors for cell in cells) else 0


def report(cells, streams):
    print(f"\npaced streams: {TOKENS} tokens, {TOKEN_DELAY * 1000:g} ms a token")
    print(f"{'streams':>7} {'scenario':8} {'streams/s':>9} {'TTFC p50':>9} {'CPU/stream':>10} "
          f"{'thr/floor':>9} {'TTFC-floor':>10} {'CPU/floor':>9} errors")
    for n in streams:
        row = {cell.scenario: cell for cell in cells if cell.streams == n}
        floor = row.get("floor")
        for cell in row.values():
            ratios = ("", "", "")
            if floor is not None and cell.scenario not in ("floor", "direct"):
                ratios = (f"{100 * cell.throughput / floor.throughput:.0f}%",
                          f"{cell.ttfc_p50 - floor.ttfc_p50:+.1f} ms",
                          f"{cell.cpu_per_stream / floor.cpu_per_stream:.1f}x")
            print(f"{n:7d} {cell.scenario:8} {cell.throughput:9.1f} {cell.ttfc_p50:7.1f}ms "
                  f"{cell.cpu_per_stream:8.2f}ms {ratios[0]:>9} {ratios[1]:>10} {ratios[2]:>9} "
                  f"{sum(cell.errors.values())}")
    relay = next((c for c in cells if c.scenario == "relay" and c.streams == max(streams)), None)
    floor = next((c for c in cells if c.scenario == "floor" and c.streams == max(streams)), None)
    if relay and floor:
        checks = [("throughput, of the floor's", 100 * relay.throughput / floor.throughput,
                   ">=", 90, "%"),
                  ("first chunk p50, over the floor's", relay.ttfc_p50 - floor.ttfc_p50,
                   "<=", 15, "ms"),
                  ("CPU per stream, of the floor's", relay.cpu_per_stream / floor.cpu_per_stream,
                   "<=", 3, "x")]
        print(f"\nrelay at {relay.streams} streams:")
        for what, value, sense, target, unit in checks:
            ok = value >= target if sense == ">=" else value <= target
            print(f"  {what}: {value:.1f} {unit} (target {sense} {target} {unit}) "
                  f"{'OK' if ok else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
