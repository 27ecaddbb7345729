"""A worker remembers public LLMs' rows (services/routes.py): calls after the
first read nothing from the database, and a PATCH or DELETE is seen by the
very next call. In the app on the stack's database and bus; the cache itself
with a bus of its own."""
import dataclasses
import re

import pytest
import sqlalchemy as sa
from responses import matchers

from extensions import db
from services.bus.base import RoutesChanged
from services.errors import NotFound
from services.inference import Route, Target
from services.routes import RouteCache

UPSTREAM = "http://upstream.test/v1"
OTHER = "http://other.test/v1"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"id": "c1", "object": "chat.completion", "choices": []}


@pytest.fixture
def admin(client, auth):
    def call(method, path, **kwargs):
        return client.open(f"/api/v1{path}", method=method, headers=auth("admin"), **kwargs)
    return call


@pytest.fixture
def infer(client, auth, admin):
    created = admin("POST", "/llms", json={"name": "gpt-x", "model": "row-model",
                                           "url": UPSTREAM, "api_key": "sk-first"})
    assert created.status_code == 201

    def call(name="gpt-x"):
        return client.post(f"/api/v1/llms/{name}/infer", json=CHAT, headers=auth("client"))
    return call


@pytest.fixture
def llm_reads(app):
    """The statements that read the llm table, as they run."""
    seen = []

    def record(_conn, _cursor, statement, *_):
        if statement.lstrip().upper().startswith("SELECT") and re.search(r"\bFROM llm\b", statement):
            seen.append(statement)

    with app.app_context():
        sa.event.listen(db.engine, "before_cursor_execute", record)
        yield seen
        sa.event.remove(db.engine, "before_cursor_execute", record)


def test_calls_after_the_first_read_no_row(infer, upstream, llm_reads):
    for _ in range(3):
        upstream.post(f"{UPSTREAM}/chat/completions", json=COMPLETION)
    assert [infer().status_code for _ in range(3)] == [200] * 3
    assert len(llm_reads) == 1


def test_the_call_after_a_patch_goes_where_the_patch_says(infer, admin, upstream):
    upstream.post(f"{UPSTREAM}/chat/completions", json=COMPLETION)
    assert infer().status_code == 200
    assert admin("PATCH", "/llms/gpt-x", json={"url": OTHER, "model": "new-model",
                                               "api_key": "sk-second"}).status_code == 200
    upstream.post(f"{OTHER}/chat/completions", json=COMPLETION, match=[
        matchers.header_matcher({"Authorization": "Bearer sk-second"}),
        matchers.json_params_matcher({**CHAT, "model": "new-model"})])
    assert infer().status_code == 200
    assert upstream.calls[-1].request.url.startswith(OTHER)


def test_a_patch_refused_changes_nothing_remembered(infer, admin, upstream):
    upstream.post(f"{UPSTREAM}/chat/completions", json=COMPLETION)
    upstream.post(f"{UPSTREAM}/chat/completions", json=COMPLETION)
    assert infer().status_code == 200
    refused = admin("PATCH", "/llms/gpt-x", json={"url": OTHER, "version": 99})
    assert refused.status_code == 409
    assert infer().status_code == 200   # still the first URL: `upstream` would refuse another


def test_the_call_after_a_delete_is_404(infer, admin, upstream):
    upstream.post(f"{UPSTREAM}/chat/completions", json=COMPLETION)
    assert infer().status_code == 200
    assert admin("DELETE", "/llms/gpt-x").status_code == 204
    gone = infer()
    assert gone.status_code == 404
    assert gone.json["error"]["code"] == "llm_not_found"


def test_an_endpoint_the_llm_does_not_serve_is_refused_from_memory_too(infer, admin, upstream,
                                                                         client, auth):
    assert admin("PATCH", "/llms/gpt-x", json={"endpoints": ["chat/completions"]}).status_code \
        == 200
    upstream.post(f"{UPSTREAM}/chat/completions", json=COMPLETION)
    assert infer().status_code == 200
    for _ in range(2):
        refused = client.post("/v1/completions", json={"model": "gpt-x", "prompt": "hi"},
                              headers=auth("client"))
        assert refused.status_code == 400
        assert refused.json["error"]["code"] == "endpoint_not_supported"


# -- the cache alone ------------------------------------------------------------

class Bus:
    """The routes version of a bus, and how often it was asked."""

    def __init__(self):
        self.version = 0
        self.asked = 0

    def routes_version(self):
        self.asked += 1
        return str(self.version)

    def acquire_slot(self, target):
        if target.seen_at is not None and target.seen_at != str(self.version):
            raise RoutesChanged()


def target(name="a", kind="public", url="http://one", max_concurrency=None):
    return Target(name, kind, "active", "m", url, None, None, None, max_concurrency)


def reader(*routes):
    """read() for RouteCache: each call the next route (or raises it), or runs it."""
    calls = []

    def read():
        calls.append(1)
        step = routes[len(calls) - 1]
        if isinstance(step, Exception):
            raise step
        return step() if callable(step) else step
    read.calls = calls
    return read


def run(cache, bus, read, name="a", endpoint="chat/completions"):
    """A call through the cache: the URL it would go to."""
    def call(route):
        bus.acquire_slot(route.targets[0])
        return route.targets[0].url
    return cache.run(name, endpoint, read, call)


def test_a_row_changed_while_it_is_read_is_read_again_at_the_next_call():
    bus = Bus()
    cache = RouteCache(bus)

    def read_while_patched():
        old = Route.single(target(url="http://old"))
        bus.version += 1   # the PATCH commits while the old row is on its way
        return old

    read = reader(read_while_patched, Route.single(target(url="http://new")))
    assert run(cache, bus, read) == "http://old"   # this call and the PATCH were concurrent
    assert run(cache, bus, read) == "http://new"
    assert run(cache, bus, read) == "http://new"
    assert len(read.calls) == 2


def test_a_call_on_a_changed_row_reads_it_again_and_goes_on():
    bus = Bus()
    cache = RouteCache(bus)
    read = reader(Route.single(target(url="http://old")), Route.single(target(url="http://new")))
    assert run(cache, bus, read) == "http://old"
    bus.version += 1
    assert run(cache, bus, read) == "http://new"
    assert run(cache, bus, read) == "http://new"
    assert len(read.calls) == 2


def test_virtual_llms_pools_capacities_and_misses_are_read_every_time():
    bus = Bus()
    cache = RouteCache(bus)
    virtual = Route.single(target("v", kind="virtual"))
    scheduled = Route.single(target("s", max_concurrency=2))
    pool = Route("pool:m", (target(),), pool="m")
    reads = {name: reader(*[route] * 3) for name, route in
             (("v", virtual), ("s", scheduled), ("pool:m", pool))}
    for name, read in reads.items():
        for _ in range(3):
            run(cache, bus, read, name=name)
    missing = reader(NotFound("no"), NotFound("no"))
    for _ in range(2):
        with pytest.raises(NotFound):
            run(cache, bus, missing, name="x")
    assert {name: len(read.calls) for name, read in reads.items()} == {"v": 3, "s": 3,
                                                                        "pool:m": 3}
    assert bus.asked == 4   # once for each of v and s, and at each miss; never for a pool


def test_an_endpoint_the_remembered_row_does_not_serve_is_read_again():
    bus = Bus()
    cache = RouteCache(bus)
    both = dataclasses.replace(target(), endpoints=("chat/completions", "completions"))
    read = reader(Route.single(target()), Route.single(both))
    run(cache, bus, read)
    assert run(cache, bus, read, endpoint="completions") == "http://one"
    assert len(read.calls) == 2


def test_an_entry_lapses():
    bus, clock = Bus(), [0.0]
    cache = RouteCache(bus, ttl=5.0, timer=lambda: clock[0])
    read = reader(*[Route.single(target())] * 2)
    run(cache, bus, read)
    clock[0] = 4.9
    run(cache, bus, read)
    clock[0] = 5.1
    run(cache, bus, read)
    assert len(read.calls) == 2
