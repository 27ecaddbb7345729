"""Switchboard's overhead: the same chat-completions requests straight to a
fast fake upstream and through Switchboard, at each concurrency, streamed and
not, in one run. Prints p50/p99 latency and throughput per scenario and how
each compares with `direct`, and the CPU time one request costs the
scenario's server process (the fake upstream for `direct`, the gunicorn
worker for `switchboard`): a figure that noise from other processes on the
machine moves much less than latency or throughput.

    python -m bench                       # or: make bench
    python -m bench --duration 2 --concurrency 1,4,16 --modes plain

Targets (2-core machine), per scenario: `switchboard` (a public LLM) adds
<= 1.5 ms p50 at c=1 and keeps >= 6% of direct's throughput at c=16; `relay`
(a virtual LLM through a long-polling publisher) adds <= 4 ms p50 at c=1, a
stream's first chunk comes <= 5 ms later than direct's, and it keeps >= 3%
of direct's throughput at c=16. The scale-out scenarios (`switchboard-2w`,
`relay-2w`: two workers on PostgreSQL + Redis) add <= 3 ms p50 at c=1 over
their one-worker memory-bus figure, and `switchboard-2w` serves >= 1.3x the
one-worker public throughput at c=16. PostgreSQL and Redis must answer on
localhost (tests/support/services.sh starts them).
"""
import argparse
import json
import sys
from dataclasses import dataclass

from bench.load import LoadResult, run_load
from bench.scenarios import BASELINE, SCENARIOS
from bench.server import BenchContext, cpu_seconds

MODES = {"plain": False, "stream": True}


def request_body(stream: bool) -> bytes:
    return json.dumps({
        "model": "bench-model", "stream": stream, "temperature": 0.2, "max_tokens": 32,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Say something about foxes."}],
    }).encode()


@dataclass
class Cell:
    mode: str
    concurrency: int
    scenario: str
    result: LoadResult
    cpu: float | None = None  # seconds of the scenario's server processes

    @property
    def cpu_per_request_ms(self) -> float:
        if self.cpu is None or not self.result.count:
            return float("nan")
        return 1000 * self.cpu / self.result.count


def run(args) -> list[Cell]:
    ctx = BenchContext(scale_out_db=args.scale_out_db, workers=args.workers)
    scenarios = [SCENARIOS[name]() for name in args.scenarios]
    cells = []
    try:
        for scenario in scenarios:
            scenario.prepare(ctx)
        for mode in args.modes:
            body = request_body(MODES[mode])
            for concurrency in args.concurrency:
                # With --rounds, the scenarios take turns (in alternating
                # order), so that a busy spell of the machine falls on all.
                measured = {}
                for turn in range(args.rounds):
                    order = scenarios if turn % 2 == 0 else scenarios[::-1]
                    for scenario in order:
                        cell = _measure(ctx, scenario, mode, body, concurrency, args,
                                        warmup=args.warmup if turn == 0 else 0)
                        measured[scenario.name] = _merge(measured.get(scenario.name), cell)
                for scenario in scenarios:
                    cell = measured[scenario.name]
                    cells.append(cell)
                    print(f"  {mode:6} c={concurrency:<3} {scenario.name:12} "
                          f"{cell.result.count:7d} ok {cell.result.error_count:5d} errors",
                          file=sys.stderr, flush=True)
    finally:
        for scenario in scenarios:
            scenario.close()
        ctx.close()
    return cells


def _measure(ctx, scenario, mode, body, concurrency, args, warmup) -> Cell:
    url, headers = scenario.endpoint(ctx)
    load = dict(concurrency=concurrency, stream=MODES[mode], max_requests=args.max_requests)
    if warmup:
        run_load(url, headers, body, duration=warmup, **load)
    pids = scenario.server_pids(ctx)
    cpu_before = cpu_seconds(pids)
    result = run_load(url, headers, body, duration=args.duration / args.rounds, **load)
    cpu_after = cpu_seconds(pids)
    cpu = None if None in (cpu_before, cpu_after) else cpu_after - cpu_before
    return Cell(mode, concurrency, scenario.name, result, cpu)


def _merge(into: Cell | None, cell: Cell) -> Cell:
    """One cell of two rounds' measurements."""
    if into is None:
        return cell
    a, b = into.result, cell.result
    errors = dict(a.errors)
    for key, n in b.errors.items():
        errors[key] = errors.get(key, 0) + n
    result = LoadResult(a.latencies + b.latencies, a.first_bytes + b.first_bytes, errors,
                        a.elapsed + b.elapsed)
    cpu = None if None in (into.cpu, cell.cpu) else into.cpu + cell.cpu
    return Cell(into.mode, into.concurrency, into.scenario, result, cpu)


def table(cells: list[Cell]) -> str:
    header = (f"{'mode':6} {'c':>3}  {'scenario':12} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'ttfc ms':>8} {'req/s':>8} {'errors':>6} {'cpu/req ms':>10}  {'+p50 ms':>8} "
              f"{'% direct':>8}")
    lines = [header, "-" * len(header)]
    baselines = {(c.mode, c.concurrency): c.result for c in cells if c.scenario == BASELINE}
    for cell in cells:
        r = cell.result
        line = (f"{cell.mode:6} {cell.concurrency:3d}  {cell.scenario:12} "
                f"{r.percentile(50):8.2f} {r.percentile(99):8.2f} "
                f"{r.percentile(50, 'first_bytes'):8.2f} {r.throughput:8.0f} "
                f"{r.error_count:6d} {cell.cpu_per_request_ms:10.3f}")
        base = baselines.get((cell.mode, cell.concurrency))
        if base is not None and cell.scenario != BASELINE:
            line += (f"  {r.percentile(50) - base.percentile(50):8.2f} "
                     f"{100 * r.throughput / base.throughput:7.1f}%")
        lines.append(line)
    return "\n".join(lines)


def verdicts(cells: list[Cell]) -> list[str]:
    """Each scenario's targets, per mode, compared with direct."""
    baselines = {(c.mode, c.concurrency): c.result for c in cells if c.scenario == BASELINE}
    out = []
    for cell in cells:
        base = baselines.get((cell.mode, cell.concurrency))
        if cell.scenario == BASELINE or base is None:
            continue
        targets = SCENARIOS[cell.scenario].targets
        label = f"{cell.scenario} {cell.mode}"
        if cell.concurrency == 1 and cell.mode == "stream" and "ttfc_ms" in targets:
            added = (cell.result.percentile(50, "first_bytes")
                     - base.percentile(50, "first_bytes"))
            out.append(_verdict(f"{label}: added time to first chunk at c=1", added,
                                targets["ttfc_ms"], "ms"))
        elif cell.concurrency == 1 and "added_p50_ms" in targets:
            added = cell.result.percentile(50) - base.percentile(50)
            out.append(_verdict(f"{label}: added p50 at c=1", added, targets["added_p50_ms"],
                                "ms"))
        if cell.concurrency == 16 and "throughput_ratio" in targets:
            ratio = cell.result.throughput / base.throughput
            out.append(_verdict(f"{label}: throughput at c=16, of direct", 100 * ratio,
                                100 * targets["throughput_ratio"], "%", at_least=True))
        out += _verdicts_over(cell, cells, targets, label)
    return out


def _verdicts_over(cell, cells, targets, label):
    """A scale-out scenario against the one-worker scenario it names in `over`."""
    other = next((c for c in cells if c.scenario == targets.get("over")
                  and (c.mode, c.concurrency) == (cell.mode, cell.concurrency)), None)
    if other is None:
        return []
    out = []
    if cell.concurrency == 1 and "added_p50_ms_over" in targets:
        added = cell.result.percentile(50) - other.result.percentile(50)
        out.append(_verdict(f"{label}: p50 at c=1 over {other.scenario}", added,
                            targets["added_p50_ms_over"], "ms"))
    if cell.concurrency == 16 and "throughput_over" in targets:
        ratio = cell.result.throughput / other.result.throughput
        out.append(_verdict(f"{label}: throughput at c=16, of {other.scenario}", ratio,
                            targets["throughput_over"], "x", at_least=True))
    return out


def _verdict(what, value, target, unit, at_least=False):
    ok = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    return f"{what}: {value:.2f} {unit} (target {sign} {target:g} {unit}) " + (
        "OK" if ok else "MISSED")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda cast: lambda text: [cast(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--duration", type=float, default=4.0,
                        help="seconds of measured load per cell (default 4)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="split each cell's duration into this many turns, the scenarios "
                             "taking turns (default 1); on a busy machine, compare "
                             "scenarios with several")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="seconds of unmeasured load before each cell (default 0.5)")
    parser.add_argument("--concurrency", type=csv(int), default=[1, 16],
                        help="comma-separated concurrencies (default 1,16)")
    parser.add_argument("--modes", type=csv(str), default=list(MODES),
                        help="comma-separated: plain,stream (default both)")
    parser.add_argument("--scenarios", type=csv(str), default=list(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)")
    parser.add_argument("--scale-out-db", choices=["postgres", "sqlite"], default="postgres",
                        help="the database of the *-2w scenarios (default postgres)")
    parser.add_argument("--workers", type=int, default=2,
                        help="gunicorn workers of the *-2w scenarios (default 2)")
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="cap on requests per cell (default 200000)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS] + [
        m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown scenario or mode: {', '.join(unknown)}")
    if BASELINE not in args.scenarios:
        args.scenarios.insert(0, BASELINE)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = run(args)
    print(table(cells))
    print()
    for line in verdicts(cells):
        print(line)
    return 1 if any(c.result.error_count for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
