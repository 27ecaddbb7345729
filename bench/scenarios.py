"""Scenarios: the ways a request reaches the fake upstream's answer.

Each scenario is prepared once per run (it may start processes or register
rows through `ctx`, a BenchContext) and then names the URL and headers the
load generator posts the same chat-completions body to. `direct` is the
baseline every other scenario is compared with.

To add one (e.g. `relay`: a test publisher answering a virtual LLM through
the long-poll protocol, its backend being `ctx.upstream.url`), subclass
Scenario and add it to SCENARIOS.
"""
from bench.server import BenchContext, child_pids


class Scenario:
    name = ""
    description = ""

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


class SwitchboardPublic(Scenario):
    name = "switchboard"
    description = "a public LLM through Switchboard's /api/v1/llms/<name>/infer"
    llm = "bench-public"

    def prepare(self, ctx):
        ctx.register_public_llm(self.llm, ctx.upstream.url)

    def endpoint(self, ctx):
        server = ctx.switchboard()
        return f"{server.url}/api/v1/llms/{self.llm}/infer", server.headers("client")

    def server_pids(self, ctx):
        return child_pids(ctx.switchboard().process.pid)  # the gunicorn worker


SCENARIOS = {scenario.name: scenario for scenario in (Direct, SwitchboardPublic)}
BASELINE = Direct.name
