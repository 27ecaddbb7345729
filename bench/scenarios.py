"""Scenarios: the ways a request reaches the fake upstream's answer.

Each scenario is prepared once per run (it may start processes or register
rows through `ctx`, a BenchContext) and then names the URL and headers the
load generator posts the same chat-completions body to. `direct` is the
baseline every other scenario is compared with.

To add one, subclass Scenario and add it to SCENARIOS. `targets` are what
the run is judged by against `direct` (2-core machine).
"""
import subprocess
import sys

from bench.server import BenchContext, child_pids
from tests.support.live import REPO_ROOT


class Scenario:
    name = ""
    description = ""
    # added_p50_ms: at c=1, over direct; ttfc_ms: a stream's added time to its
    # first chunk at c=1; throughput_ratio: at c=16, of direct.
    targets: dict = {}

    def prepare(self, ctx: BenchContext) -> None:
        """Start what the scenario needs; called once before any load."""

    def endpoint(self, ctx: BenchContext) -> tuple[str, dict]:
        """(URL to POST a chat-completions body to, extra headers)."""
        raise NotImplementedError

    def server_pids(self, ctx: BenchContext) -> list[int]:
        """The processes whose CPU time a request costs (the table's `cpu/req`)."""
        return []

    def close(self) -> None:
        """Stop what `prepare` started."""


class Direct(Scenario):
    name = "direct"
    description = "straight to the fake upstream"

    def endpoint(self, ctx):
        return f"{ctx.upstream.url}/chat/completions", {}

    def server_pids(self, ctx):
        return [ctx.upstream.process.pid]


# Metrics, usage counting and request ids (DESIGN.md, "Operations") may add
# at most 0.2 ms p50 at c=1 and cost at most 5% of throughput at c=16: each
# scenario is judged against its `-bare` twin (SWITCHBOARD_INSTRUMENT=false,
# a Switchboard of its own) when the run has both.
INSTRUMENT_TARGETS = {"added_p50_ms_over": 0.2, "throughput_over": 0.95}


class SwitchboardPublic(Scenario):
    name = "switchboard"
    description = "a public LLM through Switchboard's /api/v1/llms/<name>/infer"
    targets = {"added_p50_ms": 1.5, "throughput_ratio": 0.06, "over": "switchboard-bare",
               **INSTRUMENT_TARGETS}
    llm = "bench-public"
    bus = "memory"
    instrument = True

    def prepare(self, ctx):
        ctx.register_public_llm(self.llm, ctx.upstream.url, self.bus, self.instrument)

    def endpoint(self, ctx):
        server = ctx.switchboard(self.bus, self.instrument)
        return f"{server.url}/api/v1/llms/{self.llm}/infer", server.headers("client")

    def server_pids(self, ctx):
        # the gunicorn workers
        return child_pids(ctx.switchboard(self.bus, self.instrument).process.pid)


class Relay(Scenario):
    name = "relay"
    description = ("a virtual LLM: Switchboard relays to a publisher long-polling on "
                   "loopback (bench/relay_publisher.py), which asks the fake upstream")
    targets = {"added_p50_ms": 4.0, "ttfc_ms": 5.0, "throughput_ratio": 0.03,
               "over": "relay-bare", **INSTRUMENT_TARGETS}
    llm = "bench-relay"
    bus = "memory"
    endpoints = "chat/completions"  # what the publisher declares, comma-separated
    instrument = True

    def __init__(self):
        self.publisher = None

    def prepare(self, ctx):
        server = ctx.switchboard(self.bus, self.instrument)
        self.publisher = subprocess.Popen(
            [sys.executable, "-m", "bench.relay_publisher", "--server", server.url,
             "--token", server.tokens["publisher"], "--upstream", ctx.upstream.url,
             "--llm", self.llm, "--endpoints", self.endpoints], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        line = self.publisher.stdout.readline()
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError(f"the relay publisher did not start: {line!r}")

    def endpoint(self, ctx):
        server = ctx.switchboard(self.bus, self.instrument)
        return f"{server.url}/api/v1/llms/{self.llm}/infer", server.headers("client")

    def server_pids(self, ctx):
        return child_pids(ctx.switchboard(self.bus, self.instrument).process.pid)

    def close(self):
        if self.publisher is not None and self.publisher.poll() is None:
            self.publisher.terminate()
            self.publisher.wait(5)


class SwitchboardPublicBare(SwitchboardPublic):
    name = "switchboard-bare"
    description = "a public LLM, SWITCHBOARD_INSTRUMENT=false"
    targets = {"added_p50_ms": 1.5, "throughput_ratio": 0.06}
    instrument = False


class RelayBare(Relay):
    name = "relay-bare"
    description = "a virtual LLM, SWITCHBOARD_INSTRUMENT=false"
    targets = {"added_p50_ms": 4.0, "ttfc_ms": 5.0, "throughput_ratio": 0.03}
    instrument = False


# Scale-out: the same on two workers, PostgreSQL and Redis, judged against the
# one-worker memory-bus figures of the same run: `over` names that scenario.
class SwitchboardPublicScaledOut(SwitchboardPublic):
    name = "switchboard-2w"
    description = "a public LLM, two workers on PostgreSQL + Redis"
    targets = {"over": "switchboard", "added_p50_ms_over": 3.0, "throughput_over": 1.3}
    bus = "redis"


class RelayScaledOut(Relay):
    name = "relay-2w"
    description = "a virtual LLM, two workers on PostgreSQL + Redis"
    targets = {"over": "relay", "added_p50_ms_over": 3.0}
    bus = "redis"


SCENARIOS = {scenario.name: scenario for scenario in (
    Direct, SwitchboardPublic, SwitchboardPublicBare, Relay, RelayBare,
    SwitchboardPublicScaledOut, RelayScaledOut)}
BASELINE = Direct.name
