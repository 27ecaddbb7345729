"""Scale-out end to end: real gunicorn servers with two gevent workers each,
sharing the stack's database and one Redis, as hosts behind nginx do.

- two hosts: a client on one, the publisher on the other;
- Redis going away and coming back under a running server;
- a worker killed with SIGKILL in the middle of traffic.
"""
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import redis
import requests

from bench.server import child_pids
from tests.support import stack
from tests.support.protocol_publisher import ProtocolPublisher
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = stack.only_on(bus="redis")

SETTINGS = {"SWITCHBOARD_TASK_PICKUP_TIMEOUT": "5", "SWITCHBOARD_STREAM_KEEPALIVE": "0.5",
            "SWITCHBOARD_WAKE_TIMEOUT": "5", "SWITCHBOARD_SESSION_LIVENESS": "5",
            "SWITCHBOARD_MAX_PENDING_PER_LLM": "3"}
ASK = {"messages": [{"role": "user", "content": "hi"}]}


def infer(server, name, body=ASK, **kwargs):
    return requests.post(f"{server.url}/api/v1/llms/{name}/infer", json=body,
                         headers=server.headers("client"), timeout=kwargs.pop("timeout", 30),
                         **kwargs)


def data_events(response):
    return [line[6:].decode() for line in response.iter_lines() if line.startswith(b"data: ")]


# -- two hosts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def hosts(module_live_server_factory):
    first = module_live_server_factory(SETTINGS)
    second = module_live_server_factory(SETTINGS, share_with=first)
    return first, second


@pytest.fixture
def publish(hosts):
    """publish(name, handler=None, **llm) → a publisher on the *second* host."""
    started = []

    def start(name, handler=None, **llm):
        args = {"handler": handler} if handler else {}
        publisher = ProtocolPublisher(hosts[1], [{"name": name, "model": f"{name}-model", **llm}],
                                      **args).start()
        started.append(publisher)
        return publisher

    yield start
    for publisher in started:
        publisher.stop()


def test_a_client_on_one_host_is_answered_by_a_publisher_polling_the_other(hosts, publish):
    publish("across")
    response = infer(hosts[0], "across")
    assert response.status_code == 200
    assert response.json()["echo"]["model"] == "across-model"


def test_a_stream_crosses_hosts_chunk_by_chunk_with_one_done(hosts, publish):
    def stream(publisher, task):
        words = [json.dumps({"choices": [{"delta": {"content": w}}]}) for w in ("a", "b", "c")]
        for seq, word in enumerate(words):
            publisher.chunks(task["task_id"], [word], seq=seq)
        publisher.chunks(task["task_id"], ["[DONE]"], seq=3)

    publish("streams-across", stream)
    response = infer(hosts[0], "streams-across", {**ASK, "stream": True}, stream=True)
    events = data_events(response)
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["a", "b", "c"]
    assert events[-1] == "[DONE]"


def test_a_client_leaving_on_one_host_cancels_the_task_at_the_other(hosts, publish):
    release = threading.Event()
    publisher = publish("walks-away", lambda p, t: release.wait(10))
    with pytest.raises(requests.Timeout):
        infer(hosts[0], "walks-away", timeout=0.5)
    wait_until(lambda: publisher.cancels, timeout=8, message="the cancel reached the publisher")
    release.set()
    assert len(publisher.cancels) == 1


def test_requests_on_both_hosts_share_one_wake(hosts, publish):
    kinds = []

    def handler(publisher, task):
        kinds.append(task["kind"])
        if task["kind"] == "wake":
            wait_until(lambda: _waiting_on(hosts[0], "sleepy") >= 3, message="all three wait")
        publisher.result(task["task_id"], status=200, body={"kind": task["kind"]})

    publish("sleepy", handler, initial_status="hibernating")
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda host: infer(host, "sleepy"),
                                  [hosts[0], hosts[1], hosts[0]]))
    assert [r.status_code for r in responses] == [200] * 3
    assert sorted(kinds) == ["infer"] * 3 + ["wake"]


def test_the_pending_limit_counts_requests_on_every_host(hosts, publish):
    release = threading.Event()
    publish("crowded", lambda p, t: (release.wait(10),
                                     p.result(t["task_id"], status=200, body={})))
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(infer, host, "crowded") for host in (hosts[0], hosts[1], hosts[0])]
        wait_until(lambda: _waiting_on(hosts[0], "crowded") == 3, message="three requests wait")
        refused = [infer(host, "crowded") for host in hosts]
        release.set()
        assert [f.result(15).status_code for f in held] == [200] * 3
    assert [r.status_code for r in refused] == [429, 429]
    assert all(r.headers["Retry-After"] for r in refused)


def test_the_pending_limit_counts_public_llm_calls_on_every_host(hosts, fake_openai):
    first, second = hosts
    created = requests.post(f"{first.url}/api/v1/llms", headers=first.headers("admin"),
                            json={"name": "public-crowd", "type": "openai", "model": "m",
                                  "url": fake_openai.url}, timeout=10)
    assert created.status_code == 201
    for _ in range(3):
        fake_openai.script(body={"object": "chat.completion", "choices": []}, delay=2.0)
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(infer, host, "public-crowd") for host in (first, second, first)]
        wait_until(lambda: _waiting_on(first, "public-crowd") == 3, message="three calls out")
        refused = [infer(host, "public-crowd") for host in hosts]
        assert [f.result(15).status_code for f in held] == [200] * 3
    assert [r.status_code for r in refused] == [429, 429]
    assert _waiting_on(first, "public-crowd") == 0  # every slot was given back


def test_a_public_llm_patched_on_one_host_is_called_as_patched_on_the_other(hosts, fake_openai):
    first, second = hosts
    admin = first.headers("admin")
    assert requests.post(f"{first.url}/api/v1/llms", headers=admin, timeout=10, json={
        "name": "public-moving", "model": "m-0", "url": fake_openai.url}).status_code == 201
    for round_ in range(1, 13):
        assert [infer(second, "public-moving").status_code for _ in range(3)] == [200] * 3
        assert [r["json"]["model"] for r in fake_openai.chat_requests[-3:]] == [f"m-{round_ - 1}"] * 3
        patched = requests.patch(f"{first.url}/api/v1/llms/public-moving", headers=admin,
                                 json={"model": f"m-{round_}"}, timeout=10)
        assert patched.status_code == 200
    assert requests.delete(f"{first.url}/api/v1/llms/public-moving", headers=admin,
                           timeout=10).status_code == 204
    assert [infer(second, "public-moving").status_code for _ in range(3)] == [404] * 3


def _redis(server) -> redis.Redis:
    return redis.Redis.from_url(server.bus_settings["REDIS_URL"], decode_responses=True)


def _waiting_on(server, llm) -> int:
    """Requests counted against the LLM's pending limit, by every worker (read from Redis)."""
    client = _redis(server)
    try:
        return client.hlen(f"{server.redis_prefix}n:{llm}")
    finally:
        client.close()


# -- Redis going away ----------------------------------------------------------------

@pytest.fixture
def proxied_server(live_server_factory):
    target = urlsplit(stack.REDIS_URL)
    proxy = TcpProxy(target.hostname, target.port or 6379).start()
    url = target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    server = live_server_factory({**SETTINGS, "REDIS_URL": url})
    yield server, proxy
    proxy.stop()


def test_while_redis_is_away_requests_get_503_and_the_server_recovers_by_itself(proxied_server):
    server, proxy = proxied_server
    publisher = ProtocolPublisher(server, [{"name": "weathered", "model": "m"}]).start()
    assert infer(server, "weathered").status_code == 200
    assert requests.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"), json={
        "name": "weathered-public", "model": "old", "url": "http://127.0.0.1:9/v1"},
        timeout=10).status_code == 201
    proxy.cut()
    response = infer(server, "weathered", timeout=15)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "bus_unavailable"
    assert response.headers["Retry-After"] == "1"
    ready = requests.get(f"{server.url}/readyz", timeout=15)
    assert (ready.status_code, ready.json()["checks"]) == (503, {"database": "ok", "bus": "fail"})
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    unknown = infer(server, "no-such-llm", timeout=15)   # needs no bus: still a 404
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "llm_not_found")
    # A change to a public LLM that the other workers could not hear of is not made.
    refused = requests.patch(f"{server.url}/api/v1/llms/weathered-public",
                             headers=server.headers("admin"), json={"model": "new"}, timeout=15)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "bus_unavailable")
    # The commands never need Redis.
    assert server.flask("gc-sweep", "--json").returncode == 0
    assert "client" in server.flask("tokens", "list").stdout
    proxy.restore()
    wait_until(lambda: requests.get(f"{server.url}/readyz", timeout=15).status_code == 200,
               timeout=20, message="ready again")
    wait_until(lambda: infer(server, "weathered").status_code == 200, timeout=20,
               message="answers again, without a restart")
    row = requests.get(f"{server.url}/api/v1/llms/weathered-public",
                       headers=server.headers("admin"), timeout=10).json()
    assert row["model"] == "old"
    publisher.stop()


def test_a_server_starts_while_redis_is_down(live_server_factory):
    from tests.support.live import free_port

    server = live_server_factory({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    response = requests.post(f"{server.url}/api/v1/publishers/register",
                             headers=server.headers("publisher"),
                             json={"llms": [{"name": "x", "type": "openai", "model": "m"}]},
                             timeout=15)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "bus_unavailable"


# -- a worker killed mid-traffic ---------------------------------------------------------

def test_a_worker_killed_mid_traffic_loses_only_its_requests(live_server_factory):
    # Room for many requests: the kernel picks the worker of each new connection, and
    # may hand a run of them to the same one.
    limit = 40
    server = live_server_factory({**SETTINGS, "SWITCHBOARD_MAX_PENDING_PER_LLM": str(limit),
                                  "SWITCHBOARD_TASK_PICKUP_TIMEOUT": "20"})
    answer = threading.Event()
    posted = []

    def handler(publisher, task):
        answer.wait(30)
        posted.append(publisher.result(task["task_id"], status=200, body={"ok": True}).status_code)

    publisher = ProtocolPublisher(server, [{"name": "steady", "model": "m"}], handler).start()
    assert len(child_pids(server.process.pid)) == 2
    with ThreadPoolExecutor(limit) as pool:
        # Requests until both workers hold some.
        pending, holders = [], []
        while len(pending) < 4 or len(set(holders)) < 2:
            assert len(pending) < limit, f"{limit} requests in a row landed on one worker"
            pending.append(pool.submit(_infer_or_error, server, "steady"))
            holders = wait_until(lambda: _holding_pids(server, "steady", len(pending)),
                                 timeout=10, message="the request waits")
        victim = max(set(holders), key=holders.count)
        lost = holders.count(victim)
        os.kill(victim, signal.SIGKILL)
        # Once its lease lapses, its tasks are over for the publisher: answers get 410.
        wait_until(lambda: _holding_pids(server, "steady", len(pending) - lost), timeout=20,
                   message="the dead worker's requests no longer count")
        answer.set()
        results = [future.result(30) for future in pending]
    assert results.count(200) == len(pending) - lost
    assert results.count("connection lost") == lost
    wait_until(lambda: len(posted) == len(pending), message="the publisher answered every task")
    assert sorted(posted) == sorted([200] * (len(pending) - lost) + [410] * lost)
    # Nothing is stuck: gunicorn replaced the worker, and the limit's worth fits again.
    wait_until(lambda: len(child_pids(server.process.pid)) == 2, message="a new worker")
    publisher.handler = lambda p, t: p.result(t["task_id"], status=200, body={"again": True})
    with ThreadPoolExecutor(limit) as pool:
        again = list(pool.map(lambda _: infer(server, "steady"), range(limit)))
    assert [r.status_code for r in again] == [200] * limit
    publisher.stop()


def _infer_or_error(server, name):
    try:
        return infer(server, name).status_code
    except requests.ConnectionError:
        return "connection lost"


def _holding_pids(server, llm, count):
    """The worker pid of each request counted at the LLM (its lease, read from Redis)
    by a live worker, once there are `count` of them."""
    client = _redis(server)
    try:
        workers = client.hvals(f"{server.redis_prefix}n:{llm}")
        alive = {w for w in workers if (client.zscore(f"{server.redis_prefix}workers", w) or 0)
                 > time.time()}
    finally:
        client.close()
    pids = [int(w.split(":")[1]) for w in workers if w in alive]
    return pids if len(pids) == count else None


# -- every worker takes connections ----------------------------------------------------

def test_each_worker_accepts_new_connections_on_a_socket_of_its_own(hosts):
    # One socket shared by the workers leaves most keep-alive connections with the
    # worker quickest to accept; with one each, the kernel spreads them over all.
    server = hosts[0]
    workers = child_pids(server.process.pid)
    assert len(workers) == 2
    listening = _listening_sockets(urlsplit(server.url).port)
    assert sorted(pid for pid in workers if _socket_inodes(pid) & listening) == sorted(workers)
    assert len(listening) == len(workers)


def _listening_sockets(port):
    """The inodes of the TCP sockets listening on `port` (state 0A in /proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid):
    inodes = set()
    for fd in os.scandir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(fd.path)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes
