"""Pools, capacity and the fair queue end to end: gunicorn + gevent (two workers
in the Redis half, and a second host sharing the database and Redis),
publishers speaking the protocol over HTTP, clients over HTTP."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import stack
from tests.support.protocol_publisher import ProtocolPublisher
from tests.support.waiting import wait_until

SETTINGS = {"SWITCHBOARD_TASK_PICKUP_TIMEOUT": "10", "SWITCHBOARD_STREAM_KEEPALIVE": "0.5",
            "SWITCHBOARD_QUEUE_TIMEOUT": "20", "SWITCHBOARD_SESSION_LIVENESS": "5"}
ASK = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def server(module_live_server_factory):
    return module_live_server_factory(SETTINGS)


@pytest.fixture(scope="module")
def light_token(server):
    raw = server.flask("tokens", "create", "light-client", "--role", "client").stdout.strip()
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture
def publishers(server):
    started = []

    def start(name, model, handler=None, **llm):
        args = {"handler": handler} if handler else {}
        publisher = ProtocolPublisher(server, [{"name": name, "model": model, **llm}],
                                      **args).start()
        started.append(publisher)
        return publisher

    yield start
    for publisher in started:
        publisher.stop()


class Gauge:
    """Tasks a publisher runs at once: now, and the most ever."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.served = []

    def handler(self, delay=0.0, release=None, reply=None):
        def handle(publisher, task):
            if task["kind"] != "infer":
                return publisher.result(task["task_id"], status=200, body={"ok": True})
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
                self.served.append(task["body"]["messages"][-1]["content"])
            try:
                if release is not None:
                    release.wait(15)
                time.sleep(delay)  # the backend's own pace, not an ordering of the test
            finally:
                # Done before the result is posted: the server frees the slot as the result
                # arrives, so the next task may reach us before that post has returned.
                with self.lock:
                    self.now -= 1
            body = reply or {"object": "chat.completion", "choices": [
                {"message": {"role": "assistant", "content": publisher.llms[0]["name"]}}]}
            publisher.result(task["task_id"], status=200, body=body)
        return handle


def pool_infer(server, model, content="hi", headers=None, stream=False, **kwargs):
    return requests.post(f"{server.url}/v1/chat/completions",
                         headers=headers or server.headers("client"), stream=stream,
                         json={"model": f"pool:{model}", "stream": stream,
                               "messages": [{"role": "user", "content": content}]},
                         timeout=kwargs.pop("timeout", 30), **kwargs)


def answered_by(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_a_pool_spreads_work_over_its_members_and_never_exceeds_a_capacity(server, publishers):
    fast, slow = Gauge(), Gauge()
    publishers("fast-box", "spread", fast.handler(delay=0.05), max_concurrency=2)
    publishers("slow-box", "spread", slow.handler(delay=0.3), max_concurrency=1)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: answered_by(pool_infer(server, "spread", str(n))),
                                range(12)))
    assert set(answers) == {"fast-box", "slow-box"}
    assert answers.count("fast-box") > answers.count("slow-box")  # the free one gets more
    assert (fast.peak, slow.peak) == (2, 1)


def test_a_failing_member_costs_the_client_nothing_but_time(server, publishers):
    good = Gauge()
    publishers("broken-box", "mixed", lambda p, t: p.result(t["task_id"], error="GPU fell off"))
    publishers("good-box", "mixed", good.handler())
    answers = [answered_by(pool_infer(server, "mixed", str(n))) for n in range(4)]
    assert answers == ["good-box"] * 4


def test_a_hibernating_member_is_woken_only_when_no_awake_one_can_answer(server, publishers):
    kinds = []

    def sleeper(publisher, task):
        kinds.append(task["kind"])
        publisher.result(task["task_id"], status=200, body={"object": "chat.completion",
                         "choices": [{"message": {"content": "sleeper"}}]})

    awake = Gauge()
    publishers("asleep-box", "dozy", sleeper, initial_status="hibernating")
    first = publishers("awake-box", "dozy", awake.handler())
    assert answered_by(pool_infer(server, "dozy")) == "awake-box"
    assert kinds == []  # no wake while an awake member can answer
    first.stop(disconnect=True)
    assert answered_by(pool_infer(server, "dozy")) == "sleeper"
    assert kinds == ["wake", "infer"]


class Streams:
    """A publisher handler that streams one chunk (its LLM's name) for every
    task, each held until the test lets one go; `started` lists the task
    contents in the order the publisher got them."""

    def __init__(self):
        self.started = []
        self.go = threading.Semaphore(0)
        self.running = 0

    def handler(self, publisher, task):
        self.started.append(task["body"]["messages"][-1]["content"])
        self.running += 1
        try:
            self.go.acquire(timeout=15)
            if task.get("streaming"):
                word = json.dumps({"choices": [{"delta": {"content": publisher.llms[0]["name"]}}]})
                publisher.chunks(task["task_id"], [word, "[DONE]"], seq=0)
            else:
                publisher.result(task["task_id"], status=200, body={"choices": []})
        finally:
            self.running -= 1


class Lines:
    """A streamed response read line by line, through one iterator."""

    def __init__(self, response):
        self.response = response
        self.lines = response.iter_lines(decode_unicode=True)

    def next(self) -> str:
        return next(line for line in self.lines if line)

    def data(self) -> list[str]:
        return [line for line in self.lines if line.startswith("data: ")]

    def close(self):
        self.response.close()


def queued_stream(server, model, content, headers=None) -> Lines:
    return Lines(pool_infer(server, model, content, headers, stream=True))


def test_a_light_client_is_served_before_a_heavy_clients_queue(server, publishers, light_token):
    streams = Streams()
    publishers("single-box", "fair", streams.handler, max_concurrency=1)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(pool_infer, server, "fair", "heavy 0")
        wait_until(lambda: streams.started == ["heavy 0"], message="the first one runs")
        queued = []
        for n in range(1, 5):  # four more of the heavy client's requests wait in line
            queued.append(queued_stream(server, "fair", f"heavy {n}"))
            assert queued[-1].next() == f": queued, position {n}"
        light = queued_stream(server, "fair", "light", light_token)
        assert light.next() == ": queued, position 1"  # next, not fifth
        for _ in range(5):
            streams.go.release()
        wait_until(lambda: len(streams.started) == 6, message="every request ran")
        for _ in range(5):
            streams.go.release()
        assert running.result(15).status_code == 200
        for stream in [*queued, light]:
            assert stream.data()[-1] == "data: [DONE]"
    assert streams.started[1] == "light"


def test_a_waiting_stream_hears_its_position_and_then_its_answer(server, publishers):
    streams = Streams()
    publishers("narrow-box", "narrow", streams.handler, max_concurrency=1)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(pool_infer, server, "narrow", "first")
        wait_until(lambda: streams.started == ["first"], message="the first runs")
        response = pool_infer(server, "narrow", "second", stream=True)
        assert response.status_code == 200  # committed at once: it waits in line
        lines = response.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line) == ": queued, position 1"
        assert next(line for line in lines if line) == ": queued, position 1"  # kept alive
        streams.go.release()
        streams.go.release()
        rest = [line for line in lines if line.startswith("data: ")]
        assert blocker.result(15).status_code == 200
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[0][6:])["choices"][0]["delta"]["content"] == "narrow-box"


def test_a_request_that_waits_too_long_is_503(live_server_factory):
    server = live_server_factory({**SETTINGS, "SWITCHBOARD_QUEUE_TIMEOUT": "1.5"})
    streams = Streams()
    publisher = ProtocolPublisher(server, [{"name": "tight-box", "model": "tight",
                                            "max_concurrency": 1}], streams.handler).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(pool_infer, server, "tight", "first")
            wait_until(lambda: streams.started == ["first"], message="the first runs")
            timed_out = pool_infer(server, "tight")
            assert timed_out.status_code == 503
            assert timed_out.json()["error"]["code"] == "queue_timeout"
            assert timed_out.headers["Retry-After"]
            stream = queued_stream(server, "tight", "too late")
            assert stream.next() == ": queued, position 1"
            [last] = stream.data()  # its headers went out: the timeout is its last event
            assert json.loads(last[6:])["error"]["code"] == "queue_timeout"
            streams.go.release()
            assert blocker.result(15).status_code == 200
    finally:
        publisher.stop()


def test_a_request_that_leaves_the_queue_frees_its_place(server, publishers):
    streams = Streams()
    publishers("door-box", "door", streams.handler, max_concurrency=1)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(pool_infer, server, "door", "first")
        wait_until(lambda: streams.started == ["first"], message="the first runs")
        leaving = queued_stream(server, "door", "leaving")
        assert leaving.next() == ": queued, position 1"
        staying = queued_stream(server, "door", "staying")
        assert staying.next() == ": queued, position 2"
        leaving.close()  # a client that gives up while queued
        wait_until(lambda: staying.next() == ": queued, position 1", timeout=5,
                   message="its place moved up within the 2 s client check")
        streams.go.release()
        assert blocker.result(15).status_code == 200
        wait_until(lambda: "staying" in streams.started, message="the next one runs")
        streams.go.release()
        assert staying.data()[-1] == "data: [DONE]"
    assert streams.started == ["first", "staying"]


@stack.only_on(bus="redis")
def test_capacity_holds_across_hosts(server, module_live_server_factory, publishers):
    other_host = module_live_server_factory(SETTINGS, share_with=server)
    gauge = Gauge()
    publishers("shared-box", "hosts", gauge.handler(delay=0.2), max_concurrency=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: pool_infer((server, other_host)[n % 2], "hosts"),
                                range(8)))
    assert [r.status_code for r in results] == [200] * 8
    assert gauge.peak == 2
