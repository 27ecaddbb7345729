"""The publisher protocol, fuzzed (hypothesis): whatever a publisher sends to
register, heartbeat, poll, result and chunks, the answer is a success or a
4xx in our error envelope, never a 5xx; and afterwards nothing is stuck: no
task, lease or waiting request is left on the bus."""
import json
import string
import threading
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LLM = {"name": "fuzzed", "type": "openai", "model": "m"}
ASK = {"messages": [{"role": "user", "content": "hi"}]}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# JSON values, with the characters that broke things before: NUL, newlines,
# non-BMP, and numbers at the edges.
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(text, inner, max_size=4), max_leaves=12)
names = st.sampled_from(["fuzzed", "ok-name", "", "a" * 101, "abc\n", "x/y", "%00", "ü"]) | text
path_parts = st.sampled_from(["%2F", "%2E%2E%2F", "%00", "a b", "..", "x" * 300]) | text.map(quote)


@pytest.fixture
def app_config():
    return {"POLL_WAIT_MAX": 0.02, "TASK_PICKUP_TIMEOUT": 2.0, "INFER_TIMEOUT": 2.0,
            "SESSION_LIVENESS": 5.0}


@pytest.fixture
def protocol(app, client, auth):
    """A registered session with one real task in flight (a client waiting in a
    thread), so fuzzed results and chunks reach a real task too."""
    registered = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                             json={"llms": [LLM]})
    assert registered.status_code == 201
    session_id = registered.json["session_id"]
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(app.test_client().post(
        "/api/v1/llms/fuzzed/infer", headers=auth("client"), json=ASK)))
    waiting.start()
    task_id = None
    while task_id is None:
        tasks = client.get(f"/api/v1/publishers/{session_id}/tasks?wait=0.02",
                           headers=auth("publisher")).json["tasks"]
        task_id = next((t["task_id"] for t in tasks if t["kind"] == "infer"), None)
    yield {"session_id": session_id, "task_id": task_id}
    waiting.join(10)
    assert answers and answers[0].status_code in (200, 400, 502, 504)
    bus = app.extensions["task_bus"]
    stats = bus.stats()
    assert (stats["tasks"], stats["pending"]) == (0, 0), stats
    gauges = bus.gauges()
    assert (gauges["tasks_waiting"], gauges["tasks_in_flight"]) == ({}, {}), gauges


def check(response):
    """A success, or a 4xx in the envelope: never a 5xx (nor a redirect)."""
    status = response.status_code
    assert 200 <= status < 300 or 400 <= status < 500, (status, response.get_data(as_text=True))
    if status >= 400:
        error = response.json["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["code"], str)


def post_raw(client, auth, path, body):
    return client.post(path, headers={**auth("publisher"), "Content-Type": "application/json"},
                       data=body if isinstance(body, bytes) else json.dumps(body))


@FUZZ
@given(body=values | st.fixed_dictionaries({}, optional={
    "session_id": st.none() | names | values,
    "llms": st.lists(st.fixed_dictionaries({"name": names}, optional={
        "type": names, "model": text | values, "tier": text, "description": values,
        "extra_config": values, "initial_status": text}), max_size=3) | values,
    "agents": st.lists(st.dictionaries(st.sampled_from(["name", "llm", "system_prompt",
                                                        "default_params", "project"]),
                                       values), max_size=2) | values}))
def test_register_never_fails_with_a_5xx(client, auth, protocol, body):
    check(post_raw(client, auth, "/api/v1/publishers/register", body))


@FUZZ
@given(session=path_parts, body=values)
def test_heartbeat_never_fails_with_a_5xx(client, auth, protocol, session, body):
    check(post_raw(client, auth, f"/api/v1/publishers/{session}/heartbeat", body))
    check(post_raw(client, auth, f"/api/v1/publishers/{protocol['session_id']}/heartbeat",
                   body))


@FUZZ
@given(session=st.none() | path_parts, wait=st.none() | text | st.floats().map(str),
       ack=st.none() | st.lists(text, max_size=70).map(",".join) | text,
       extra=st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=5), text,
                             max_size=2))
def test_poll_never_fails_with_a_5xx(client, auth, protocol, session, wait, ack, extra):
    query = {**extra, **({"wait": wait} if wait is not None else {}),
             **({"ack": ack} if ack is not None else {})}
    path = f"/api/v1/publishers/{session or protocol['session_id']}/tasks"
    response = client.get(path, headers=auth("publisher"), query_string=query)
    check(response)
    if response.status_code == 200:
        assert all("task_id" in task for task in response.json["tasks"])


@FUZZ
@given(real=st.booleans(), task=path_parts, body=values | st.fixed_dictionaries({}, optional={
    "status": values | st.integers(), "body": values, "error": values}))
def test_result_never_fails_with_a_5xx(client, auth, protocol, real, task, body):
    task_id = protocol["task_id"] if real else task
    check(post_raw(client, auth, f"/api/v1/tasks/{task_id}/result", body))


@FUZZ
@given(real=st.booleans(), task=path_parts, body=values | st.fixed_dictionaries({}, optional={
    "chunks": st.lists(st.fixed_dictionaries({}, optional={"data": values, "event": values}),
                       max_size=4) | values,
    "seq": values | st.integers(min_value=-2, max_value=10), "done": values}))
def test_chunks_never_fail_with_a_5xx(client, auth, protocol, real, task, body):
    task_id = protocol["task_id"] if real else task
    check(post_raw(client, auth, f"/api/v1/tasks/{task_id}/chunks", body))


@FUZZ
@given(body=st.binary(max_size=60))
def test_bodies_that_are_not_json_are_400s(client, auth, protocol, body):
    for path in ("/api/v1/publishers/register", f"/api/v1/tasks/{protocol['task_id']}/chunks",
                 f"/api/v1/tasks/{protocol['task_id']}/result"):
        check(post_raw(client, auth, path, body))
