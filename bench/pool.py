"""A pool under load, and what its fair queue costs: three members (public
LLMs on a fake backend that answers in 0.6 s, the pace of a 30-token answer at
20 ms a token), capacity 4 each, so the pool does 12 / 0.6 = 20 answers a
second at most. One client token sends 24 requests at a time, another 2.

    python -m bench.pool              # about 40 s
    python -m bench.pool --duration 20

Targets (2-core machine): total throughput >= 90% of the pool's capacity; the
light client's p50 latency <= 1.5x its p50 on the idle pool; and the
scheduler's added p50 on an idle pool <= 1 ms (a pool with one roomy member
on an instant backend, against the same backend as a plain LLM, c=1).
"""
import argparse
import json
import sys
import threading

from bench.load import run_load
from bench.server import BenchContext, FakeUpstream

PACE = 0.6
MEMBERS, CAPACITY = 3, 4
BODY = json.dumps({"messages": [{"role": "user", "content": "Tell me about foxes."}],
                   "max_tokens": 30}).encode()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0,
                        help="seconds of the loaded phase (default 12)")
    args = parser.parse_args(argv)
    ctx = BenchContext()
    paced = FakeUpstream(delay=PACE)
    try:
        server = ctx.switchboard()
        admin = server.headers("admin")
        for n in range(MEMBERS):
            _create(ctx, server, admin, f"paced-{n}", "bench-pool", paced.url, CAPACITY)
        _create(ctx, server, admin, "instant", "bench-instant", ctx.upstream.url, None)
        _create(ctx, server, admin, "instant-pooled", "bench-roomy", ctx.upstream.url, 1024)
        heavy = server.headers("client")
        light = {"Authorization": "Bearer " + server.flask(
            "tokens", "create", "light", "--role", "client").stdout.strip()}
        pool_url = f"{server.url}/api/v1/pools/bench-pool/infer"

        # The scheduler's cost: one roomy pool member against the same LLM unscheduled.
        run_load(f"{server.url}/api/v1/llms/instant/infer", heavy, BODY, concurrency=1,
                 duration=1.0)
        plain = run_load(f"{server.url}/api/v1/llms/instant/infer", heavy, BODY,
                         concurrency=1, duration=4.0)
        scheduled = run_load(f"{server.url}/api/v1/pools/bench-roomy/infer", heavy, BODY,
                             concurrency=1, duration=4.0)
        idle = run_load(pool_url, light, BODY, concurrency=2, duration=4.0)

        results = {}

        def load(name, headers, concurrency):
            results[name] = run_load(pool_url, headers, BODY, concurrency=concurrency,
                                     duration=args.duration)

        threads = [threading.Thread(target=load, args=("heavy", heavy, 24)),
                   threading.Thread(target=load, args=("light", light, 2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        paced.stop()
        ctx.close()

    capacity = MEMBERS * CAPACITY / PACE
    total = results["heavy"].throughput + results["light"].throughput
    added = scheduled.percentile(50) - plain.percentile(50)
    light_ratio = results["light"].percentile(50) / idle.percentile(50)
    errors = sum(r.error_count for r in (plain, scheduled, idle, *results.values()))
    print(f"pool of {MEMBERS} x capacity {CAPACITY}, {PACE:g} s an answer: "
          f"capacity {capacity:.1f} req/s")
    print(f"loaded (24 + 2 at a time): heavy {results['heavy'].throughput:.1f} req/s, "
          f"light {results['light'].throughput:.1f} req/s, p50 heavy "
          f"{results['heavy'].percentile(50):.0f} ms, light {results['light'].percentile(50):.0f} "
          f"ms; idle pool p50 {idle.percentile(50):.0f} ms; errors {errors}")
    print(_verdict("throughput, of the pool's capacity", 100 * total / capacity, 90, "%",
                   at_least=True))
    print(_verdict("light client's p50, of its p50 on the idle pool", light_ratio, 1.5, "x"))
    print(_verdict(f"scheduler's added p50 on an idle pool ({plain.percentile(50):.2f} -> "
                   f"{scheduled.percentile(50):.2f} ms)", added, 1.0, "ms"))
    return 1 if errors else 0


def _create(ctx, server, admin, name, model, url, capacity):
    response = ctx.http.post(f"{server.url}/api/v1/llms", headers=admin, timeout=10, json={
        "name": name, "model": model, "url": url, "max_concurrency": capacity})
    response.raise_for_status()


def _verdict(what, value, target, unit, at_least=False):
    ok = value >= target if at_least else value <= target
    return (f"{what}: {value:.2f} {unit} (target {'>=' if at_least else '<='} {target:g} "
            f"{unit}) {'OK' if ok else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
