"""The relay end to end: the real gunicorn + gevent server, a publisher speaking
the long-poll protocol over HTTP, clients over HTTP."""
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import stack
from tests.support.protocol_publisher import ProtocolPublisher
from tests.support.scrape import gauge
from tests.support.waiting import wait_until

SETTINGS = {"SWITCHBOARD_TASK_PICKUP_TIMEOUT": "1.5", "SWITCHBOARD_STREAM_KEEPALIVE": "0.3",
            "SWITCHBOARD_WAKE_TIMEOUT": "3", "SWITCHBOARD_SESSION_LIVENESS": "5"}
ASK = {"model": "ignored", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def server(module_live_server_factory):
    return module_live_server_factory(SETTINGS)


@pytest.fixture
def publishers(server):
    started = []

    def start(name, handler=None, **kwargs):
        llm = {"name": name, "type": "openai", "model": f"{name}-model",
               **kwargs.pop("llm", {})}
        args = {"handler": handler} if handler else {}
        publisher = ProtocolPublisher(server, [llm], **args, **kwargs).start()
        started.append(publisher)
        return publisher

    yield start
    for publisher in started:
        publisher.stop()


def infer(server, name, body=ASK, **kwargs):
    return requests.post(f"{server.url}/api/v1/llms/{name}/infer", json=body,
                         headers=server.headers("client"), timeout=30, **kwargs)


def sse_events(response):
    """The `data:` payloads and comment lines of an SSE response, in order."""
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            events.append(line[6:].decode())
        elif line.startswith(b":"):
            events.append(":")
    return events


def streaming_handler(chunks_per_batch):
    def handler(publisher, task):
        words = ["The", " quick", " brown", " fox"]
        data = [json.dumps({"choices": [{"delta": {"content": w}}]}) for w in words]
        data.append("[DONE]")
        for seq in range(0, len(data), chunks_per_batch):
            publisher.chunks(task["task_id"], data[seq:seq + chunks_per_batch], seq=seq)
    return handler


def test_non_streamed_relay_returns_the_publishers_answer(server, publishers):
    publishers("plain")
    response = infer(server, "plain")
    assert response.status_code == 200
    # The row's model replaced the client's.
    assert response.json()["echo"]["model"] == "plain-model"
    assert response.json()["echo"]["messages"] == ASK["messages"]


def test_streamed_relay_sends_each_chunk_as_one_event_ending_with_one_done(server, publishers):
    publishers("streamy", streaming_handler(chunks_per_batch=2))
    response = infer(server, "streamy", {**ASK, "stream": True}, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    events = [e for e in sse_events(response) if e != ":"]
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [
        "The", " quick", " brown", " fox"]
    assert events[-1] == "[DONE]"


def test_a_held_poll_wakes_at_once_when_a_task_arrives(server):
    publisher = ProtocolPublisher(server, [{"name": "held", "model": "m"}])
    publisher.register()
    got = {}

    def poll():
        started = time.monotonic()
        got["tasks"] = publisher.poll(wait=20)
        got["ended"] = time.monotonic()
        got["started"] = started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)  # the poll is now held
    sent = time.monotonic()
    client = threading.Thread(target=infer, args=(server, "held"))
    client.start()
    poller.join(10)
    assert [t["kind"] for t in got["tasks"]] == ["infer"]
    assert got["ended"] - sent < 1.0
    publisher.result(got["tasks"][0]["task_id"], status=200, body={})
    client.join(10)


def test_hundred_concurrent_requests_each_get_their_own_answer(server, publishers):
    publishers("busy")
    bodies = [{"messages": [{"role": "user", "content": f"question {n}"}]} for n in range(100)]
    with ThreadPoolExecutor(100) as pool:
        responses = list(pool.map(lambda b: infer(server, "busy", b), bodies))
    assert [r.status_code for r in responses] == [200] * 100
    assert [r.json()["echo"]["messages"][0]["content"] for r in responses] == [
        f"question {n}" for n in range(100)]


def test_offline_publisher_is_503_at_once(server, publishers):
    publisher = publishers("leaving")
    publisher.stop(disconnect=True)
    started = time.monotonic()
    response = infer(server, "leaving")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "publisher_offline"
    assert time.monotonic() - started < 1


def test_task_never_picked_up_is_504(server):
    ProtocolPublisher(server, [{"name": "deaf", "model": "m"}]).register()  # never polls
    response = infer(server, "deaf")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "pickup_timeout"


def test_publisher_error_is_502_with_its_message(server, publishers):
    publishers("failing", lambda p, t: p.result(t["task_id"], error="backend refused: 7"))
    response = infer(server, "failing")
    assert response.status_code == 502
    assert "backend refused: 7" in response.json()["error"]["message"]


def test_backend_status_and_body_pass_through(server, publishers):
    body = {"error": {"message": "context too long", "type": "invalid_request_error"}}
    publishers("picky", lambda p, t: p.result(t["task_id"], status=400, body=body))
    response = infer(server, "picky")
    assert (response.status_code, response.json()) == (400, body)


def test_duplicate_foreign_and_unknown_results(server, publishers):
    verdicts = {}
    other = {"Authorization": f"Bearer {server.flask('tokens', 'create', 'publisher-b', '--role', 'publisher').stdout.strip()}"}

    def handler(publisher, task):
        url = f"{server.url}/api/v1/tasks/{task['task_id']}/result"
        verdicts["foreign"] = requests.post(url, json={"status": 200, "body": {}},
                                            headers=other, timeout=5).status_code
        verdicts["first"] = publisher.result(task["task_id"], status=200, body={}).status_code
        verdicts["duplicate"] = publisher.result(task["task_id"], status=200,
                                                 body={}).status_code
        verdicts["unknown"] = publisher.result("no-such-task", status=200, body={}).status_code

    publishers("strict", handler)
    assert infer(server, "strict").status_code == 200
    deadline = time.monotonic() + 5
    while len(verdicts) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert verdicts == {"foreign": 403, "first": 200, "duplicate": 409, "unknown": 404}


def test_disconnect_mid_request_fails_the_client_with_503(server, publishers):
    publishers("quitter", lambda p, t: p.api("DELETE", f"/publishers/{p.session_id}"))
    response = infer(server, "quitter")
    assert response.status_code == 503
    assert "publisher disconnected" in response.json()["error"]["message"]


def test_client_leaving_mid_stream_gets_the_publisher_a_410_and_a_cancel(server, publishers):
    outcome = {}

    def handler(publisher, task):
        publisher.chunks(task["task_id"], ['{"n": 0}'], seq=0)
        for seq in range(1, 100):  # keep streaming until told the client is gone
            time.sleep(0.1)
            status = publisher.chunks(task["task_id"], [f'{{"n": {seq}}}'], seq=seq).status_code
            if status != 200:
                outcome["status"] = status
                return

    publisher = publishers("abandoned", handler)
    response = infer(server, "abandoned", {**ASK, "stream": True}, stream=True)
    next(response.iter_lines())
    response.close()  # the client goes away
    deadline = time.monotonic() + 10
    while not ("status" in outcome and publisher.cancels) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome["status"] == 410
    assert len(publisher.cancels) == 1


def test_waiting_stream_gets_keepalive_comments(server, publishers):
    def slow(publisher, task):
        time.sleep(1.0)
        publisher.chunks(task["task_id"], ["[DONE]"], done=True)

    publishers("slowpoke", slow)
    response = infer(server, "slowpoke", {**ASK, "stream": True}, stream=True)
    events = sse_events(response)
    assert ":" in events
    assert events[-1] == "[DONE]"


# -- wake-on-demand ----------------------------------------------------------

def waking_handler(log, outcome):
    def handler(publisher, task):
        log.append(task["kind"])
        if task["kind"] == "wake":
            time.sleep(0.3)
            publisher.result(task["task_id"], **outcome)
        else:
            publisher.result(task["task_id"], status=200, body={"awake": True})
    return handler


def test_wake_then_infer_turns_the_row_active(server, publishers):
    log = []
    publishers("sleeper", waking_handler(log, {"status": 200, "body": {"ok": True}}),
               llm={"initial_status": "hibernating"})
    response = infer(server, "sleeper")
    assert (response.status_code, response.json()) == (200, {"awake": True})
    assert log == ["wake", "infer"]
    view = requests.get(f"{server.url}/api/v1/llms/sleeper", headers=server.headers("client"),
                        timeout=5).json()
    assert view["status"] == "active"


def test_concurrent_requests_share_one_wake(server, publishers):
    log = []
    publishers("dozer", waking_handler(log, {"status": 200, "body": {"ok": True}}),
               llm={"initial_status": "hibernating"})
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: infer(server, "dozer"), range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert sorted(log) == ["infer"] * 5 + ["wake"]


def test_failed_wake_fails_every_waiter_and_the_row_stays_hibernating(server, publishers):
    log = []
    publishers("comatose", waking_handler(log, {"error": "GPU is on fire"}),
               llm={"initial_status": "hibernating"})
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: infer(server, "comatose"), range(3)))
    assert [r.status_code for r in responses] == [502] * 3
    assert all("GPU is on fire" in r.json()["error"]["message"] for r in responses)
    assert log == ["wake"]
    view = requests.get(f"{server.url}/api/v1/llms/comatose", headers=server.headers("client"),
                        timeout=5).json()
    assert view["status"] == "hibernating"


def test_gc_sweep_while_requests_are_in_flight(server, publishers):
    release = threading.Event()

    def held(publisher, task):
        release.wait(10)
        publisher.result(task["task_id"], status=200, body={"done": True})

    publisher = publishers("inflight", held)
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(infer, server, "inflight") for _ in range(4)]
        wait_until(lambda: len(publisher.tasks_seen) == 4, message="four tasks in flight")
        sweeps = [server.flask("gc-sweep", "--json") for _ in range(2)]
        release.set()
        responses = [f.result(15) for f in pending]
    assert all(json.loads(s.stdout)["marked_inactive"] == 0 for s in sweeps)
    assert [r.json() for r in responses] == [{"done": True}] * 4


def test_task_is_not_lost_to_a_poll_whose_publisher_hung_up(server):
    publisher = ProtocolPublisher(server, [{"name": "flaky-net", "model": "m"}])
    publisher.register()
    # A poll held by a publisher that then dies (its socket closes).
    dead = socket.create_connection(("127.0.0.1", server.port))
    dead.sendall(f"GET /api/v1/publishers/{publisher.session_id}/tasks?wait=20 HTTP/1.1\r\n"
                 f"Host: x\r\nAuthorization: {server.headers('publisher')['Authorization']}"
                 f"\r\n\r\n".encode())
    # (a poll some earlier test left hanging is let go within 2 s)
    wait_until(lambda: gauge(server, "switchboard_held_polls") == 1, timeout=10,
               message="the poll held")
    dead.close()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(infer, server, "flaky-net")
        # The task is queued while the dead poll is still held.
        wait_until(lambda: gauge(server, "switchboard_tasks_waiting", llm="flaky-net") == 1,
                   message="the task queued")
        tasks = publisher.poll(wait=5)  # the restarted publisher polls again
        assert [t["kind"] for t in tasks] == ["infer"]
        publisher.result(tasks[0]["task_id"], status=200, body={"survived": True})
        assert pending.result(10).json() == {"survived": True}


def test_non_streamed_client_leaving_cancels_its_task(server, publishers):
    release = threading.Event()
    publisher = publishers("walkaway", lambda p, t: release.wait(10))
    with pytest.raises(requests.Timeout):
        requests.post(f"{server.url}/api/v1/llms/walkaway/infer", json=ASK,
                      headers=server.headers("client"), timeout=0.5)
    deadline = time.monotonic() + 8  # the server checks its waiting clients every 2 s
    while not publisher.cancels and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    assert len(publisher.cancels) == 1


@stack.only_on(bus="memory")
def test_extra_workers_are_refused_while_the_bus_is_in_memory(live_server_factory):
    from bench.server import child_pids

    server = live_server_factory({"GUNICORN_CMD_ARGS": "--workers 3 --graceful-timeout 2"})
    assert len(child_pids(server.process.pid)) == 1
    assert server.log_text().count("needs exactly one worker process") == 1
    server.process.send_signal(signal.SIGTTIN)  # an operator asks for one more
    wait_until(lambda: server.log_text().count("needs exactly one worker process") == 2,
               message="gunicorn took the TTIN")
    assert len(child_pids(server.process.pid)) == 1


@stack.only_on(bus="redis")
def test_with_redis_the_server_runs_one_worker_per_core_unless_told(live_server_factory):
    from bench.server import child_pids

    server = live_server_factory({"WEB_CONCURRENCY": None})
    cores = os.cpu_count()
    wait_until(lambda: len(child_pids(server.process.pid)) == cores, message="workers booted")
    assert f"task bus: redis; {cores} worker processes" in server.log_text()
    told = live_server_factory({"WEB_CONCURRENCY": "3"})
    wait_until(lambda: len(child_pids(told.process.pid)) == 3, message="3 workers booted")
