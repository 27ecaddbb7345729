"""Embeddings through Switchboard: a batch of 16 inputs answered with 16
vectors of 384 floats (~120 kB), straight to the fake upstream, through a
public LLM and through a virtual one (the relay publisher on loopback), at
each concurrency, in one run.

    python -m bench.embeddings [--duration 4] [--concurrency 1,16]

Targets (2-core machine): at c=1 the public LLM adds <= 2 ms p50 over a
direct call, the virtual one <= 4 ms.
"""
import argparse
import json
import sys

from bench.load import run_load
from bench.scenarios import Direct, Relay, Scenario, SwitchboardPublic
from bench.server import BenchContext, cpu_seconds

INPUTS = [f"passage {n}: the quick brown fox jumps over the lazy dog" for n in range(16)]


def body(model: str) -> bytes:
    return json.dumps({"model": model, "encoding_format": "float", "input": INPUTS}).encode()


class DirectEmbeddings(Direct):
    def endpoint(self, ctx):
        return f"{ctx.upstream.url}/embeddings", {}


class PublicEmbeddings(SwitchboardPublic):
    description = "a public LLM through Switchboard's /v1/embeddings"
    llm = "bench-embed-public"

    def prepare(self, ctx):
        ctx.register_public_llm(self.llm, ctx.upstream.url, self.bus,
                                endpoints=["embeddings"])

    def endpoint(self, ctx):
        server = ctx.switchboard(self.bus)
        return f"{server.url}/v1/embeddings", server.headers("client")


class RelayEmbeddings(Relay):
    description = "a virtual LLM through Switchboard's /v1/embeddings"
    llm = "bench-embed-relay"
    endpoints = "embeddings"

    def endpoint(self, ctx):
        server = ctx.switchboard(self.bus)
        return f"{server.url}/v1/embeddings", server.headers("client")


# (name, scenario, the most it may add to direct's p50 at c=1, in ms)
SCENARIOS: list[tuple[str, type[Scenario], float | None]] = [
    ("direct", DirectEmbeddings, None), ("public", PublicEmbeddings, 2.0),
    ("relay", RelayEmbeddings, 4.0)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args(argv)
    ctx = BenchContext()
    scenarios = [(name, cls(), target) for name, cls, target in SCENARIOS]
    rows, errors = [], 0
    try:
        for _, scenario, _ in scenarios:
            scenario.prepare(ctx)
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for name, scenario, target in scenarios:
                url, headers = scenario.endpoint(ctx)
                data = body(getattr(scenario, "llm", "bench-model"))
                run_load(url, headers, data, concurrency=concurrency, duration=args.warmup)
                pids = scenario.server_pids(ctx)
                before = cpu_seconds(pids)
                result = run_load(url, headers, data, concurrency=concurrency,
                                  duration=args.duration)
                cpu = cpu_seconds(pids) - before if before is not None else float("nan")
                errors += result.error_count
                rows.append((concurrency, name, result, cpu, target))
                print(f"  c={concurrency:<3} {name:7} {result.count:7d} ok "
                      f"{result.error_count:5d} errors", file=sys.stderr, flush=True)
    finally:
        for _, scenario, _ in scenarios:
            scenario.close()
        ctx.close()
    print(f"{'c':>3}  {'scenario':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
          f"{'errors':>6} {'cpu/req ms':>10} {'+p50 ms':>8}")
    direct = {c: r for c, name, r, _, _ in rows if name == "direct"}
    verdicts = []
    for concurrency, name, result, cpu, target in rows:
        added = result.percentile(50) - direct[concurrency].percentile(50)
        print(f"{concurrency:3d}  {name:8} {result.percentile(50):8.2f} "
              f"{result.percentile(99):8.2f} {result.throughput:8.0f} {result.error_count:6d} "
              f"{1000 * cpu / max(result.count, 1):10.3f} "
              + (f"{added:8.2f}" if name != "direct" else ""))
        if concurrency == 1 and target is not None:
            verdicts.append(f"{name}: added p50 at c=1: {added:.2f} ms (target <= {target:g} ms) "
                            + ("OK" if added <= target else "MISSED"))
    print()
    print("\n".join(verdicts))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
