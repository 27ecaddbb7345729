"""An async load generator: `concurrency` keep-alive connections on loopback,
each sending the same request back to back until `duration` seconds or
`max_requests` have passed. Latency is to the last byte of the answer."""
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    first_bytes: list[float] = field(default_factory=list)  # seconds to the first body bytes
    errors: dict[str, int] = field(default_factory=dict)  # "status 502" / exception name → count
    elapsed: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float, of: str = "latencies") -> float:
        """The p-th percentile in milliseconds of `latencies` (to the last byte)
        or `first_bytes` (a stream's time to its first chunk)."""
        values = getattr(self, of)
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0] * 1000
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


async def _run(url, headers, body, *, concurrency, duration, max_requests, stream):
    result = LoadResult()
    remaining = max_requests
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:
        started = time.perf_counter()
        end = started + duration

        async def worker():
            nonlocal remaining
            while remaining > 0 and time.perf_counter() < end:
                remaining -= 1
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        if stream:
                            first = None
                            async for _ in response.content.iter_any():
                                first = first or time.perf_counter()
                        else:
                            await response.read()
                        ok = response.status == 200
                        error = None if ok else f"status {response.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    ok, error = False, type(exc).__name__
                if ok:
                    result.latencies.append(time.perf_counter() - sent)
                    if stream and first:
                        result.first_bytes.append(first - sent)
                else:
                    result.errors[error] = result.errors.get(error, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
    return result


def run_load(url: str, headers: dict, body: bytes, *, concurrency: int, duration: float,
             max_requests: int = 1_000_000, stream: bool = False) -> LoadResult:
    """POST `body` to `url` as fast as `concurrency` connections allow."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback, not {url}")
    return asyncio.run(_run(url, {"Content-Type": "application/json", **headers}, body,
                            concurrency=concurrency, duration=duration,
                            max_requests=max_requests, stream=stream))
