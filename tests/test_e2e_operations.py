"""Operations end to end on the real server (gunicorn + gevent; two workers
on PostgreSQL + Redis): request ids, log lines, /metrics over every worker,
usage as the backends reported it."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import sqlalchemy as sa

from tests.support import stack
from tests.support.fake_openai import completion, completion_chunk
from tests.support.protocol_publisher import ProtocolPublisher
from tests.support.scrape import scrape, value
from tests.support.waiting import wait_until

SETTINGS = {"SWITCHBOARD_USAGE_FLUSH_INTERVAL": "0.1", "SWITCHBOARD_SESSION_LIVENESS": "5",
            "SWITCHBOARD_QUEUE_TIMEOUT": "1", "SWITCHBOARD_STREAM_KEEPALIVE": "0.3"}
ASK = {"messages": [{"role": "user", "content": "hello there"}]}
INFER_ROUTE = "/api/v1/llms/<name>/infer"


@pytest.fixture(scope="module")
def server(module_live_server_factory):
    return module_live_server_factory(SETTINGS)


@pytest.fixture(scope="module")
def fake(module_fake_openai):
    return module_fake_openai


@pytest.fixture(autouse=True)
def fresh_fake(fake):
    fake.reset()


@pytest.fixture(scope="module")
def second_client(server):
    """Another client token: {'Authorization': ...}."""
    raw = server.flask("tokens", "create", "client-b", "--role", "client").stdout.strip()
    return {"Authorization": f"Bearer {raw}"}


def public_llm(server, fake, name):
    response = requests.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"),
                             json={"name": name, "model": "upstream-model", "url": fake.url,
                                   "api_key": "sk-e2e-ops-secret"}, timeout=10)
    assert response.status_code == 201, response.text
    return name


@pytest.fixture
def publishers(server):
    started = []

    def start(name, handler=None):
        args = {"handler": handler} if handler else {}
        publisher = ProtocolPublisher(server, [{"name": name, "type": "openai",
                                                "model": f"{name}-model"}], **args).start()
        started.append(publisher)
        return publisher

    yield start
    for publisher in started:
        publisher.stop(disconnect=True)


def infer(server, name, body=ASK, headers=None, **kwargs):
    return requests.post(f"{server.url}/api/v1/llms/{name}/infer", json=body,
                         headers=headers or server.headers("client"), timeout=30, **kwargs)


def usage_rows(server, headers=None, **params):
    response = requests.get(f"{server.url}/api/v1/usage", params=params,
                            headers=headers or server.headers("admin"), timeout=10)
    assert response.status_code == 200, response.text
    return {(row["token"], row["llm"]): row for row in response.json()}


def access_lines(server, request_id):
    return [line for line in server.log_text().splitlines()
            if "switchboard.access" in line and f"[{request_id}]" in line]


# -- request ids ---------------------------------------------------------------

def test_a_sane_request_id_is_echoed_and_sent_to_the_public_upstream(server, fake):
    llm = public_llm(server, fake, "ops-rid-public")
    response = infer(server, llm, headers={**server.headers("client"),
                                           "X-Request-Id": "client.Req-42_a"})
    assert response.status_code == 200
    assert response.headers["X-Request-Id"] == "client.Req-42_a"
    assert fake.chat_requests[-1]["headers"]["X-Request-Id"] == "client.Req-42_a"


def test_a_stream_to_a_public_upstream_carries_the_request_id_too(server, fake):
    llm = public_llm(server, fake, "ops-rid-stream")
    fake.script(chunks=["a", "b"])
    response = infer(server, llm, {**ASK, "stream": True},
                     headers={**server.headers("client"), "X-Request-Id": "stream-1"})
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert fake.chat_requests[-1]["headers"]["X-Request-Id"] == "stream-1"


def test_a_stream_whose_upstream_is_slow_to_start_carries_the_request_id_too(server, fake):
    llm = public_llm(server, fake, "ops-rid-slow")
    fake.script(chunks=["a", "b"], delay=1.0)  # kept alive with comments meanwhile
    response = infer(server, llm, {**ASK, "stream": True},
                     headers={**server.headers("client"), "X-Request-Id": "slow-1"})
    assert response.status_code == 200 and response.text.startswith(": keepalive")
    assert fake.chat_requests[-1]["headers"]["X-Request-Id"] == "slow-1"


@pytest.mark.parametrize("sent", [None, "", "has space", "x" * 129, "semi;colon", "é"])
def test_a_missing_or_insane_request_id_is_replaced_by_a_new_one(server, sent):
    headers = {} if sent is None else {"X-Request-Id": sent.encode("utf-8").decode("latin-1")}
    response = requests.get(f"{server.url}/api/v1/llms", timeout=10,
                            headers={**server.headers("client"), **headers})
    assert response.status_code == 200
    new = response.headers["X-Request-Id"]
    assert new != sent and len(new) == 32 and new.isalnum()


def test_errors_carry_a_request_id_too(server):
    for response in (requests.get(f"{server.url}/api/v1/llms", timeout=10),
                     requests.get(f"{server.url}/api/v1/llms/nope", timeout=10,
                                  headers=server.headers("client")),
                     requests.get(f"{server.url}/v1/nowhere", timeout=10,
                                  headers={**server.headers("client"), "X-Request-Id": "e-1"})):
        assert response.status_code in (401, 404)
        assert response.headers["X-Request-Id"]
    assert response.headers["X-Request-Id"] == "e-1"


def test_the_publishers_task_carries_the_request_id(server, publishers):
    publisher = publishers("ops-rid-virtual")
    response = infer(server, "ops-rid-virtual", headers={**server.headers("client"),
                                                        "X-Request-Id": "to-the-publisher"})
    assert response.status_code == 200
    (task,) = [t for t in publisher.tasks_seen if t["kind"] == "infer"]
    assert task["request_id"] == "to-the-publisher"


def test_every_log_line_of_a_request_carries_its_id_and_one_access_line_sums_it_up(server,
                                                                                   fake):
    llm = public_llm(server, fake, "ops-log")
    response = infer(server, llm, headers={**server.headers("client"), "X-Request-Id": "log-1"})
    assert response.status_code == 200
    (line,) = wait_until(lambda: access_lines(server, "log-1"), message="the access line")
    assert "POST /api/v1/llms/ops-log/infer 200 " in line and line.endswith(" llm=ops-log")
    created = next(line for line in server.log_text().splitlines() if "created public LLM ops-log"
                   in line)
    assert "[-]" not in created and "[" in created  # the admin's request id, whatever it was
    log = server.log_text()
    assert "sk-e2e-ops-secret" not in log and server.tokens["client"] not in log
    assert "alembic" not in log  # worker boots say nothing of alembic's plugins


# -- metrics -------------------------------------------------------------------

def test_metrics_need_an_admin_token(server):
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 401
    response = requests.get(f"{server.url}/metrics", headers=server.headers("client"), timeout=10)
    assert response.status_code == 403


def test_metrics_count_requests_latencies_and_tokens_whichever_worker_served_them(server, fake):
    llm = public_llm(server, fake, "ops-metrics")
    before = scrape(server)
    served_by, sent, lock = set(), [0], threading.Lock()

    def one(i):
        response = infer(server, llm, headers={**server.headers("client"),
                                               "X-Request-Id": f"metrics-{i}"})
        assert response.status_code == 200
        with lock:
            sent[0] += 1

    def worker_pids():
        for i in range(sent[0]):
            for line in access_lines(server, f"metrics-{i}"):
                served_by.add(line.split("] [")[0].rsplit("[", 1)[1])
        return len(served_by) >= (stack.LIVE_WORKERS if stack.BUS == "redis" else 1)

    with ThreadPoolExecutor(8) as pool:  # concurrent connections land on every worker
        for batch in range(20):
            list(pool.map(one, range(8 * batch, 8 * batch + 8)))
            if wait_until(lambda: len(access_lines(server, f"metrics-{sent[0] - 1}")) == 1,
                          message="the batch's access lines") and worker_pids():
                break
    assert worker_pids(), f"only workers {served_by} served"
    after = scrape(server)
    n = sent[0]
    route = dict(route=INFER_ROUTE, method="POST", status="200")
    assert value(after, "switchboard_requests_total", **route) - value(
        before, "switchboard_requests_total", **route) == n
    labels = dict(llm=llm, kind="public", stream="false")
    assert value(after, "switchboard_inference_seconds_count", **labels) == n
    assert value(after, "switchboard_inference_seconds_sum", **labels) > 0
    assert value(after, "switchboard_inference_seconds_bucket", le="+Inf", **labels) == n
    # FakeOpenAI reports one prompt and one completion token per answer.
    assert value(after, "switchboard_tokens_total", llm=llm, type="prompt") == n
    assert value(after, "switchboard_tokens_total", llm=llm, type="completion") == n


def test_the_bus_gauges_and_the_time_to_first_chunk_are_exposed(server, publishers):
    release = threading.Event()

    def slow(publisher, task):
        release.wait(10)
        publisher.chunks(task["task_id"], [json.dumps(completion_chunk("hi"))], seq=0, done=True)

    publishers("ops-gauges", slow)
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(infer, server, "ops-gauges", {**ASK, "stream": True})
        samples = wait_until(lambda: (s := scrape(server)) and value(
            s, "switchboard_tasks_in_flight", llm="ops-gauges") == 1 and value(
            s, "switchboard_held_polls") >= 1 and s)  # the publisher polls again
        assert value(samples, "switchboard_live_sessions") >= 1
        assert ("switchboard_redeliveries_total", ()) in samples
        release.set()
        assert streaming.result().status_code == 200
    samples = wait_until(lambda: (s := scrape(server)) and value(
        s, "switchboard_time_to_first_chunk_seconds_count", llm="ops-gauges",
        kind="virtual") == 1 and s)
    assert value(samples, "switchboard_tasks_in_flight", llm="ops-gauges") == 0


def test_a_wake_is_counted_once_with_its_outcome(server):
    publisher = ProtocolPublisher(server, [{"name": "ops-sleepy", "type": "openai",
                                            "model": "sleepy-model",
                                            "initial_status": "hibernating"}]).start()
    try:
        assert infer(server, "ops-sleepy").status_code == 200
        samples = scrape(server)
        assert value(samples, "switchboard_wakes_total", llm="ops-sleepy", outcome="ok") == 1
        assert value(samples, "switchboard_wakes_total", llm="ops-sleepy", outcome="failed") == 0
    finally:
        publisher.stop(disconnect=True)


def test_rejections_are_counted_by_reason(server, publishers):
    publisher = publishers("ops-offline")
    publisher.stop(disconnect=True)  # the row goes inactive: 503 publisher_offline
    before = value(scrape(server), "switchboard_rejections_total", reason="publisher_offline")
    assert infer(server, "ops-offline").status_code == 503
    assert infer(server, "ops-offline").status_code == 503
    after = value(scrape(server), "switchboard_rejections_total", reason="publisher_offline")
    assert after - before == 2


def test_a_queue_timeout_told_as_a_streams_last_event_is_a_rejection_too(server):
    release = threading.Event()

    def holds(publisher, task):
        release.wait(10)
        publisher.result(task["task_id"], status=200, body={"choices": []})

    publisher = ProtocolPublisher(server, [{"name": "ops-full", "type": "openai",
                                            "model": "full-model", "max_concurrency": 1}],
                                  holds).start()
    try:
        before = value(scrape(server), "switchboard_rejections_total", reason="queue_timeout")
        with ThreadPoolExecutor(1) as pool:
            holding = pool.submit(infer, server, "ops-full")
            wait_until(lambda: value(scrape(server), "switchboard_tasks_in_flight",
                                     llm="ops-full") == 1)
            response = infer(server, "ops-full", {**ASK, "stream": True})
            assert response.status_code == 200  # committed while it waited in line
            assert json.loads(response.text.strip().rsplit("data: ", 1)[1])["error"][
                "code"] == "queue_timeout"
            release.set()
            assert holding.result().status_code == 200
        wait_until(lambda: value(scrape(server), "switchboard_rejections_total",
                                 reason="queue_timeout") - before == 1)
    finally:
        release.set()
        publisher.stop(disconnect=True)


# -- usage ---------------------------------------------------------------------

def test_usage_matches_what_the_backends_reported_per_token_and_llm(server, fake, publishers,
                                                                   second_client):
    llm = public_llm(server, fake, "ops-usage-public")

    def virtual(publisher, task):
        publisher.result(task["task_id"], status=200, body={
            "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 11}})

    publishers("ops-usage-virtual", virtual)
    body = {"prompt_tokens": 30, "completion_tokens": 4}
    for _ in range(3):
        fake.script(body={**completion("x"), "usage": body})
    for _ in range(3):
        assert infer(server, llm).status_code == 200
    fake.script(status=429, body={"error": {"message": "slow down"}})
    assert infer(server, llm, headers=second_client).status_code == 429
    for headers in (server.headers("client"), second_client, second_client):
        assert infer(server, "ops-usage-virtual", headers=headers).status_code == 200

    def rows():
        found = usage_rows(server)
        want = {("client", llm), ("client-b", llm), ("client", "ops-usage-virtual"),
                ("client-b", "ops-usage-virtual")}
        counted = sum(found[key]["requests"] for key in want if key in found)
        return found if counted == 7 else None

    found = wait_until(rows, message="usage written by every worker")
    assert found[("client", llm)] == {
        "token": "client", "llm": llm, "requests": 3, "errors": 0, "prompt_tokens": 90,
        "completion_tokens": 12, "estimated": False}
    assert found[("client-b", llm)] == {
        "token": "client-b", "llm": llm, "requests": 1, "errors": 1, "prompt_tokens": 0,
        "completion_tokens": 0, "estimated": False}
    assert found[("client", "ops-usage-virtual")]["prompt_tokens"] == 7
    assert found[("client-b", "ops-usage-virtual")] == {
        "token": "client-b", "llm": "ops-usage-virtual", "requests": 2, "errors": 0,
        "prompt_tokens": 14, "completion_tokens": 22, "estimated": False}
    # A client sees its own rows only.
    mine = usage_rows(server, headers=second_client)
    assert mine and {token for token, _ in mine} == {"client-b"}


def test_a_stream_without_usage_is_counted_from_its_chunks_and_marked_estimated(
        server, fake, publishers):
    def streams(publisher, task):
        chunks = [json.dumps(completion_chunk(word)) for word in ("one", " two", " three")]
        if task["body"]["messages"][0]["content"] == "with usage":
            chunks.append(json.dumps({"choices": [], "usage": {"prompt_tokens": 5,
                                                               "completion_tokens": 3}}))
        publisher.chunks(task["task_id"], chunks + ["[DONE]"], seq=0, done=True)

    publishers("ops-stream-estimated", streams)
    publishers("ops-stream-exact", streams)
    ask = {"stream": True, "messages": [{"role": "user", "content": "x" * 40}]}
    assert infer(server, "ops-stream-estimated", ask).status_code == 200
    exact = {"stream": True, "messages": [{"role": "user", "content": "with usage"}]}
    assert infer(server, "ops-stream-exact", exact).status_code == 200
    found = wait_until(lambda: (rows := usage_rows(server)) and ("client", "ops-stream-exact")
                       in rows and ("client", "ops-stream-estimated") in rows and rows)
    estimated = found[("client", "ops-stream-estimated")]
    assert (estimated["prompt_tokens"], estimated["completion_tokens"],
            estimated["estimated"]) == (10, 3, True)
    exact = found[("client", "ops-stream-exact")]
    assert (exact["prompt_tokens"], exact["completion_tokens"], exact["estimated"]) == (
        5, 3, False)


def test_a_chat_with_an_agent_is_counted_on_its_llm(server, fake):
    llm = public_llm(server, fake, "ops-chat-llm")
    created = requests.post(f"{server.url}/api/v1/agents", headers=server.headers("admin"),
                            json={"name": "ops-chat-agent", "llm": llm}, timeout=10)
    assert created.status_code == 201, created.text
    fake.script(body={**completion("hi"), "usage": {"prompt_tokens": 21, "completion_tokens": 2}})
    response = requests.post(f"{server.url}/api/v1/agents/ops-chat-agent/chat",
                             headers=server.headers("client"), json={"message": "hello"},
                             timeout=30)
    assert response.status_code == 200, response.text
    found = wait_until(lambda: usage_rows(server).get(("client", llm)))
    assert (found["requests"], found["prompt_tokens"], found["completion_tokens"]) == (1, 21, 2)


# -- servers of their own --------------------------------------------------------

def _sql(server, statement):
    engine = sa.create_engine(stack.sqlalchemy_url(server.db_url))
    try:
        with engine.begin() as connection:
            return connection.execute(sa.text(statement)).all() if statement.startswith(
                "SELECT") else connection.execute(sa.text(statement))
    finally:
        engine.dispose()


def test_a_failing_usage_write_never_fails_an_inference_and_its_counts_wait(
        live_server_factory, fake_openai):
    server = live_server_factory(SETTINGS)
    llm = public_llm(server, fake_openai, "ops-flaky")
    _sql(server, "ALTER TABLE usage_bucket RENAME TO usage_bucket_away")
    try:
        for _ in range(3):
            assert infer(server, llm).status_code == 200
        wait_until(lambda: "could not write usage" in server.log_text(), message="a failed write")
        assert infer(server, llm).status_code == 200
    finally:
        _sql(server, "ALTER TABLE usage_bucket_away RENAME TO usage_bucket")
    found = wait_until(lambda: (rows := usage_rows(server)).get(("client", llm), {}).get(
        "requests") == 4 and rows, message="the kept counts written")
    assert found[("client", llm)]["prompt_tokens"] == 4


def test_usage_still_buffered_is_written_when_the_server_stops(live_server_factory,
                                                                 fake_openai):
    server = live_server_factory({"SWITCHBOARD_USAGE_FLUSH_INTERVAL": "3600"})
    llm = public_llm(server, fake_openai, "ops-shutdown")
    for _ in range(2):
        assert infer(server, llm).status_code == 200
    server.stop(timeout=15)
    rows = _sql(server, "SELECT llm, SUM(requests) FROM usage_bucket GROUP BY llm")
    assert rows == [(llm, 2)]


def test_json_log_format_writes_one_object_per_line(live_server_factory, fake_openai):
    server = live_server_factory({"SWITCHBOARD_LOG_FORMAT": "json"})
    llm = public_llm(server, fake_openai, "ops-json")
    response = infer(server, llm, headers={**server.headers("client"), "X-Request-Id": "json-1"})
    assert response.status_code == 200

    def lines():
        return [json.loads(line) for line in server.log_text().splitlines() if line.strip()]

    access = wait_until(lambda: [r for r in lines() if r.get("request_id") == "json-1"
                                 and r["name"] == "switchboard.access"])
    (record,) = access
    assert {k: record[k] for k in ("method", "path", "status", "llm", "level")} == {
        "method": "POST", "path": f"/api/v1/llms/{llm}/infer", "status": 200, "llm": llm,
        "level": "INFO"}
    assert record["duration_ms"] > 0 and record["time"] and record["message"]
    assert any(r["name"] == "gunicorn.error" for r in lines())  # gunicorn's lines too


def test_instrumentation_off_leaves_no_request_id_and_no_usage_but_the_access_line(
        live_server_factory, fake_openai):
    server = live_server_factory({**SETTINGS, "SWITCHBOARD_INSTRUMENT": "false"})
    llm = public_llm(server, fake_openai, "ops-off")
    response = infer(server, llm)
    assert response.status_code == 200 and "X-Request-Id" not in response.headers
    assert "X-Request-Id" not in fake_openai.chat_requests[-1]["headers"]
    assert usage_rows(server) == {}
    assert value(scrape(server), "switchboard_requests_total", route=INFER_ROUTE,
                 method="POST", status="200") == 0
    wait_until(lambda: "[-] switchboard.access: POST /api/v1/llms/ops-off/infer 200 "
               in server.log_text(), message="the access line, without an id")


def test_the_access_log_can_be_turned_off(live_server_factory, fake_openai):
    server = live_server_factory({"SWITCHBOARD_ACCESS_LOG": "false"})
    llm = public_llm(server, fake_openai, "ops-quiet")
    response = infer(server, llm, headers={**server.headers("client"), "X-Request-Id": "q-1"})
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "q-1"
    wait_until(lambda: value(scrape(server), "switchboard_inference_seconds_count", llm=llm,
                             kind="public", stream="false") == 1)
    assert "switchboard.access" not in server.log_text()
