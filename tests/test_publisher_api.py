"""The publisher protocol over HTTP (Flask's test client, real SQLite): status
codes and ownership, as DESIGN.md's Publisher protocol lists them."""
import json
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from extensions import db
from models import Llm, utcnow
from services import tokens as token_service
from tests.support.database import other_connection
from tests.support.waiting import wait_until

LLM = {"name": "vllm-local", "type": "openai", "model": "qwen"}
ASK = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def app_config():
    return {"POLL_WAIT_MAX": 1.0, "TASK_PICKUP_TIMEOUT": 0.3, "SESSION_LIVENESS": 5.0}


@pytest.fixture
def other_publisher(app):
    with app.app_context():
        raw = token_service.create_token(db.session, "publisher-2", "publisher")
        db.session.commit()
    return {"Authorization": f"Bearer {raw}"}


def register(client, auth, **payload):
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json={"llms": [LLM], **payload})
    assert response.status_code == 201, response.json
    return response.json


def poll(client, headers, session_id, wait=0):
    return client.get(f"/api/v1/publishers/{session_id}/tasks?wait={wait}", headers=headers)


def in_background(fn, *args, **kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn(*args, **kwargs)))
    thread.start()
    return thread, box


def take_task(client, auth, session_id):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        tasks = poll(client, auth("publisher"), session_id, wait=0.5).json["tasks"]
        if tasks:
            return tasks[0]
    raise AssertionError("no task arrived")


def infer_in_background(app, auth, body=ASK):
    return in_background(lambda: app.test_client().post(
        "/api/v1/llms/vllm-local/infer", headers=auth("client"), json=body))


# -- register -----------------------------------------------------------------

def test_register_returns_the_session_and_views_without_secrets(client, auth):
    body = register(client, auth)
    assert body["session_id"]
    [view] = body["llms"]
    assert (view["name"], view["kind"], view["status"]) == ("vllm-local", "virtual", "active")
    assert body["agents"] == []


def test_a_new_session_is_live_before_its_rows_are_seen_active(app, client, auth):
    """A client that finds the row active must find its session live too (not
    503 publisher_offline in the moment between the commit and the bus)."""
    bus = app.extensions["task_bus"]
    seen_at_touch = []
    touch = bus.touch

    def touch_and_look(session_id):
        with other_connection(app) as conn:  # what every other request sees
            seen_at_touch.append(conn.scalar(sa.select(sa.func.count()).select_from(Llm)))
        touch(session_id)

    bus.touch = touch_and_look
    session_id = register(client, auth)["session_id"]
    assert seen_at_touch == [0]
    assert bus.is_live(session_id)


def test_register_with_a_sticky_session_id_keeps_it(client, auth):
    assert register(client, auth, session_id="box-under-desk")["session_id"] == "box-under-desk"


def test_register_over_another_tokens_session_is_forbidden(client, auth, other_publisher):
    register(client, auth, session_id="mine")
    response = client.post("/api/v1/publishers/register", headers=other_publisher,
                           json={"session_id": "mine", "llms": [LLM]})
    assert response.status_code == 403
    assert response.json["error"]["code"] == "foreign_session"


def test_register_over_a_public_llm_is_a_conflict(client, auth):
    client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "vllm-local", "model": "m", "url": "http://127.0.0.1:9/v1"})
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json={"llms": [LLM]})
    assert response.status_code == 409
    assert "public" in response.json["error"]["message"]


@pytest.mark.parametrize("payload, field", [
    ({"llms": [{**LLM, "kind": "public"}]}, "llms"),
    ({"llms": [{**LLM, "name": "../etc"}]}, "llms"),
    ({"llms": [LLM, LLM]}, "llms"),
    ({"llms": [{**LLM, "initial_status": "inactive"}]}, "llms"),
    ({"llms": [LLM], "session_id": "has spaces"}, "session_id"),
    ({}, "llms"),
])
def test_register_validates_its_payload(client, auth, payload, field):
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json=payload)
    assert response.status_code == 400
    assert field in response.json["error"]["details"]


def test_client_tokens_cannot_use_the_publisher_protocol(client, auth):
    session_id = register(client, auth)["session_id"]
    for response in (
        client.post("/api/v1/publishers/register", headers=auth("client"), json={"llms": [LLM]}),
        client.post(f"/api/v1/publishers/{session_id}/heartbeat", headers=auth("client")),
        poll(client, auth("client"), session_id),
        client.post("/api/v1/tasks/x/result", headers=auth("client"), json={"error": "x"}),
        client.delete(f"/api/v1/publishers/{session_id}", headers=auth("client")),
    ):
        assert response.status_code == 403


# -- heartbeat ----------------------------------------------------------------

def test_heartbeat_of_an_unknown_session_is_404_so_the_publisher_registers_again(client, auth):
    response = client.post("/api/v1/publishers/nope/heartbeat", headers=auth("publisher"))
    assert response.status_code == 404


def test_heartbeat_after_gc_deleted_the_rows_is_404(app, client, auth, runner):
    session_id = register(client, auth)["session_id"]
    with app.app_context():
        db.session.execute(sa.update(Llm).values(status="inactive",
                                                 inactive_since=utcnow() - timedelta(days=1)))
        db.session.commit()
    runner.invoke(args=["gc-sweep"])
    response = client.post(f"/api/v1/publishers/{session_id}/heartbeat",
                           headers=auth("publisher"))
    assert response.status_code == 404


def test_heartbeat_of_another_tokens_session_is_forbidden(client, auth, other_publisher):
    session_id = register(client, auth)["session_id"]
    response = client.post(f"/api/v1/publishers/{session_id}/heartbeat", headers=other_publisher)
    assert response.status_code == 403


def test_heartbeat_answers_ok(client, auth):
    session_id = register(client, auth)["session_id"]
    response = client.post(f"/api/v1/publishers/{session_id}/heartbeat",
                           headers=auth("publisher"))
    assert (response.status_code, response.json) == (200, {"ok": True})


# -- poll ---------------------------------------------------------------------

def test_poll_wait_is_capped_by_poll_wait_max(client, auth):
    session_id = register(client, auth)["session_id"]
    started = time.monotonic()
    response = poll(client, auth("publisher"), session_id, wait=60)
    assert (response.status_code, response.json) == (200, {"tasks": []})
    assert time.monotonic() - started < 3  # POLL_WAIT_MAX is 1 s here


@pytest.mark.parametrize("wait", ["soon", "-1", "inf", "nan"])
def test_poll_rejects_a_bad_wait(client, auth, wait):
    session_id = register(client, auth)["session_id"]
    assert poll(client, auth("publisher"), session_id, wait=wait).status_code == 400


def test_poll_of_unknown_or_foreign_session(client, auth, other_publisher):
    session_id = register(client, auth)["session_id"]
    assert poll(client, auth("publisher"), "unknown").status_code == 404
    assert poll(client, other_publisher, session_id).status_code == 403


# -- results and chunks -------------------------------------------------------

def test_result_for_unknown_task_is_404(client, auth):
    response = client.post("/api/v1/tasks/nope/result", headers=auth("publisher"),
                           json={"status": 200, "body": {}})
    assert response.status_code == 404


@pytest.mark.parametrize("outcome", [{}, {"status": 200, "error": "x"}, {"status": "200"},
                                     {"status": 99, "body": {}}, {"error": ""}])
def test_result_body_must_be_one_outcome(client, auth, outcome):
    response = client.post("/api/v1/tasks/nope/result", headers=auth("publisher"), json=outcome)
    assert response.status_code == 400


def test_result_statuses_passthrough_duplicate_and_foreign(app, client, auth, other_publisher):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth)
    task = take_task(client, auth, session_id)
    url = f"/api/v1/tasks/{task['task_id']}/result"
    assert client.post(url, headers=other_publisher,
                       json={"status": 200, "body": {}}).status_code == 403
    assert client.post(url, headers=auth("publisher"),
                       json={"status": 422, "body": {"detail": "bad"}}).status_code == 200
    assert client.post(url, headers=auth("publisher"),
                       json={"status": 200, "body": {}}).status_code == 409
    thread.join(5)
    assert (box["value"].status_code, box["value"].json) == (422, {"detail": "bad"})


def test_publisher_error_is_a_502_carrying_its_message(app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth)
    task = take_task(client, auth, session_id)
    client.post(f"/api/v1/tasks/{task['task_id']}/result", headers=auth("publisher"),
                json={"error": "CUDA out of memory"})
    thread.join(5)
    assert box["value"].status_code == 502
    assert "CUDA out of memory" in box["value"].json["error"]["message"]


def test_chunks_after_the_client_went_away_are_410_and_the_publisher_gets_a_cancel(
        app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth, {**ASK, "stream": True})
    task = take_task(client, auth, session_id)
    url = f"/api/v1/tasks/{task['task_id']}/chunks"
    first = client.post(url, headers=auth("publisher"), json={"chunks": [{"data": "a"}],
                                                              "seq": 0})
    assert first.status_code == 200
    thread.join(5)
    box["value"].close()  # the client goes away mid-stream
    second = client.post(url, headers=auth("publisher"), json={"chunks": [{"data": "b"}],
                                                               "seq": 1})
    assert second.status_code == 410
    assert poll(client, auth("publisher"), session_id).json["tasks"] == [
        {"kind": "cancel", "task_id": task["task_id"]}]


# -- relay status codes ---------------------------------------------------------

def test_infer_with_no_live_session_is_503_at_once(app, client, auth):
    with app.app_context():
        db.session.add(Llm(name="vllm-local", model="m", kind="virtual", status="active",
                           provider_session_id="gone", last_heartbeat_at=utcnow()))
        db.session.commit()
    started = time.monotonic()
    response = client.post("/api/v1/llms/vllm-local/infer", headers=auth("client"), json=ASK)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "publisher_offline"
    assert time.monotonic() - started < 1


def test_task_not_picked_up_is_504(client, auth):
    register(client, auth)  # registered, counted live, but never polls
    response = client.post("/api/v1/llms/vllm-local/infer", headers=auth("client"), json=ASK)
    assert response.status_code == 504
    assert response.json["error"]["code"] == "pickup_timeout"


@pytest.mark.parametrize("app_config", [{"MAX_PENDING_PER_LLM": 1, "TASK_PICKUP_TIMEOUT": 2}])
def test_too_many_waiting_requests_is_429(app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth)
    task = take_task(client, auth, session_id)  # the first request is now in flight
    response = client.post("/api/v1/llms/vllm-local/infer", headers=auth("client"), json=ASK)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    client.post(f"/api/v1/tasks/{task['task_id']}/result", headers=auth("publisher"),
                json={"status": 200, "body": {}})
    thread.join(5)


def test_disconnect_makes_rows_inactive_and_infer_503(client, auth):
    session_id = register(client, auth)["session_id"]
    assert client.delete(f"/api/v1/publishers/{session_id}",
                         headers=auth("publisher")).status_code == 204
    view = client.get("/api/v1/llms/vllm-local", headers=auth("client")).json
    assert view["status"] == "inactive"
    response = client.post("/api/v1/llms/vllm-local/infer", headers=auth("client"), json=ASK)
    assert response.status_code == 503
    assert "inactive" in response.json["error"]["message"]


def test_maps_are_empty_after_every_path(app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth)  # answered
    task = take_task(client, auth, session_id)
    client.post(f"/api/v1/tasks/{task['task_id']}/result", headers=auth("publisher"),
                json={"status": 200, "body": {}})
    thread.join(5)
    client.post("/api/v1/llms/vllm-local/infer", headers=auth("client"), json=ASK)  # 504
    thread, box = infer_in_background(app, auth)  # disconnected mid-request
    take_task(client, auth, session_id)
    client.delete(f"/api/v1/publishers/{session_id}", headers=auth("publisher"))
    thread.join(5)
    assert box["value"].status_code == 503
    stats = app.extensions["task_bus"].stats()
    assert (stats["tasks"], stats["pending"], stats["queued"]) == (0, 0, 0)


# -- gc-sweep -----------------------------------------------------------------

def backdate_llms(app, **timestamps):
    with app.app_context():
        db.session.execute(sa.update(Llm).values(**timestamps))
        db.session.commit()


def test_gc_sweep_json_prints_totals_and_per_table_counts(app, client, auth, runner):
    register(client, auth)
    backdate_llms(app, last_heartbeat_at=utcnow() - timedelta(minutes=10))
    result = runner.invoke(args=["gc-sweep", "--json"])
    assert result.exit_code == 0
    assert result.output.count("\n") == 1
    assert json.loads(result.output) == {
        "marked_inactive": 1, "deleted": 0,
        "llms": {"marked_inactive": 1, "deleted": 0},
        "agents": {"marked_inactive": 0, "deleted": 0},
        "chat_messages": {"settled": 0}}


def test_gc_sweep_options_override_the_settings(app, client, auth, runner):
    register(client, auth)
    args = ["gc-sweep", "--json", "--heartbeat-timeout", "0", "--retention", "0"]
    a_second_ago = utcnow() - timedelta(seconds=1)
    backdate_llms(app, last_heartbeat_at=a_second_ago)  # fresh by the default 90 s
    first = json.loads(runner.invoke(args=args).output)
    backdate_llms(app, inactive_since=a_second_ago)  # kept by the default 4 h
    second = json.loads(runner.invoke(args=args).output)
    assert first["llms"] == {"marked_inactive": 1, "deleted": 0}
    assert second["llms"] == {"marked_inactive": 0, "deleted": 1}


def test_stream_ended_without_any_chunk_is_just_done(app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth, {**ASK, "stream": True})
    task = take_task(client, auth, session_id)
    client.post(f"/api/v1/tasks/{task['task_id']}/chunks", headers=auth("publisher"),
                json={"chunks": [], "done": True})
    thread.join(5)
    assert box["value"].status_code == 200
    assert box["value"].get_data() == b"data: [DONE]\n\n"


def test_streaming_request_answered_with_a_result_keeps_its_status(app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = infer_in_background(app, auth, {**ASK, "stream": True})
    task = take_task(client, auth, session_id)
    client.post(f"/api/v1/tasks/{task['task_id']}/result", headers=auth("publisher"),
                json={"status": 400, "body": {"error": {"message": "bad temperature"}}})
    thread.join(5)
    assert box["value"].status_code == 400
    assert box["value"].json == {"error": {"message": "bad temperature"}}


def test_published_agent_params_are_typed(client, auth):
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"), json={
        "llms": [LLM], "agents": [{"name": "coder", "llm": "vllm-local",
                                   "default_params": {"temperature": "hot"}}]})
    assert response.status_code == 400
    assert "agents" in response.json["error"]["details"]


def test_published_agent_must_run_on_the_sessions_own_llm(client, auth):
    client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "paid", "model": "m", "url": "http://127.0.0.1:9/v1", "api_key": "sk-op"})
    register(client, auth, session_id="other-box")  # vllm-local belongs to other-box
    for llm in ("paid", "vllm-local"):
        response = client.post("/api/v1/publishers/register", headers=auth("publisher"), json={
            "session_id": "my-box", "llms": [{**LLM, "name": "mine"}],
            "agents": [{"name": "freeloader", "llm": llm}]})
        assert response.status_code == 403, llm
        assert response.json["error"]["code"] == "foreign_llm"
    assert client.get("/api/v1/agents/freeloader", headers=auth("admin")).status_code == 404


def test_another_publisher_cannot_adopt_an_agent_and_its_threads(client, auth,
                                                                 other_publisher):
    agent = {"name": "coder", "llm": "vllm-local"}
    first = register(client, auth, agents=[agent])
    client.delete(f"/api/v1/publishers/{first['session_id']}", headers=auth("publisher"))
    response = client.post("/api/v1/publishers/register", headers=other_publisher, json={
        "llms": [LLM], "agents": [agent]})
    assert response.status_code == 409
    assert response.json["error"]["code"] == "owner_conflict"
    # The same publisher, back after a restart with a new session, takes it back.
    again = register(client, auth, agents=[agent])
    assert again["agents"][0]["id"] == first["agents"][0]["id"]


def test_gc_sweep_settles_turns_a_killed_worker_left_pending(app, runner):
    from models import Agent, ChatMessage, ChatThread

    with app.app_context():
        for row in (Llm(id="l1", name="m", model="m", url="http://127.0.0.1:9/v1"),
                    Agent(id="a1", name="bot", llm_id="l1"),
                    ChatThread(id="t1", agent_id="a1", owner="someone")):
            db.session.add(row)
            db.session.flush()
        long_ago, just_now = utcnow() - timedelta(hours=2), utcnow()
        for turn, (role, status, created) in enumerate([
                ("user", "complete", long_ago), ("assistant", "pending", long_ago),
                ("user", "complete", just_now), ("assistant", "pending", just_now)]):
            db.session.add(ChatMessage(id=f"m{turn}", thread_id="t1", turn_index=turn,
                                       role=role, status=status, created_at=created))
        db.session.commit()
    result = json.loads(runner.invoke(args=["gc-sweep", "--json"]).output)
    assert result["chat_messages"] == {"settled": 1}
    with app.app_context():
        statuses = dict(db.session.execute(sa.select(ChatMessage.id, ChatMessage.status)).all())
        error = db.session.get(ChatMessage, "m1").error
    assert statuses == {"m0": "complete", "m1": "error", "m2": "complete", "m3": "pending"}
    assert error.startswith("interrupted")


# -- delivery: ack, attempt, the poll cap ---------------------------------------------

def test_tasks_carry_their_attempt_and_an_ack_list_is_checked(app, client, auth):
    session_id = register(client, auth)["session_id"]
    poll = f"/api/v1/publishers/{session_id}/tasks"
    thread, _ = infer_in_background(app, auth)
    task = take_task(client, auth, session_id)
    assert task["attempt"] == 1
    too_many = ",".join(f"id{n}" for n in range(65))
    response = client.get(f"{poll}?wait=0&ack={too_many}", headers=auth("publisher"))
    assert response.status_code == 400
    assert "ack" in response.json["error"]["details"]
    bad = client.get(f"{poll}?wait=0&ack=no%20spaces", headers=auth("publisher"))
    assert bad.status_code == 400
    fine = client.get(f"{poll}?wait=0&ack={task['task_id']},unknown-id&cb=123",
                      headers=auth("publisher"))
    assert (fine.status_code, fine.json) == (200, {"tasks": []})
    client.post(f"/api/v1/tasks/{task['task_id']}/result", headers=auth("publisher"),
                json={"status": 200, "body": {}})
    thread.join(5)


@pytest.mark.parametrize("app_config", [{"MAX_POLLS_PER_SESSION": 1}])
def test_a_poll_past_the_sessions_cap_is_429(app, client, auth):
    session_id = register(client, auth)["session_id"]
    held, _ = in_background(lambda: app.test_client().get(
        f"/api/v1/publishers/{session_id}/tasks?wait=3", headers=auth("publisher")))
    wait_until(lambda: app.extensions["task_bus"].stats()["polls"] == 1, message="poll held")
    response = poll(client, auth("publisher"), session_id, wait=0)
    assert response.status_code == 429
    assert response.json["error"]["code"] == "too_many_polls"
    assert response.headers["Retry-After"] == "1"
    held.join(5)


# -- many streams of one session in one POST ------------------------------------

def stream_in_background(app, auth, llm="vllm-local"):
    return in_background(lambda: app.test_client().post(
        f"/api/v1/llms/{llm}/infer", headers=auth("client"), json={**ASK, "stream": True}))


def take_tasks(client, headers, session_id, count):
    tasks = []
    wait_until(lambda: tasks.extend(poll(client, headers, session_id, wait=0.2).json["tasks"])
               or len(tasks) >= count, message=f"{count} tasks")
    return [task["task_id"] for task in tasks]


def post_session_chunks(client, headers, session_id, entries):
    return client.post(f"/api/v1/publishers/{session_id}/chunks", headers=headers,
                       json={"tasks": entries})


def outcomes(response):
    assert response.status_code == 200, response.json
    return [(r["task_id"], "accepted" if r.get("accepted") else r["error"]["status"],
             r.get("error", {}).get("code")) for r in response.json["results"]]


def test_session_chunks_report_live_finished_cancelled_foreign_and_unknown_tasks_apart(
        app, client, auth, other_publisher):
    session_id = register(client, auth)["session_id"]
    other_session = client.post("/api/v1/publishers/register", headers=other_publisher, json={
        "llms": [{**LLM, "name": "other-llm"}]}).json["session_id"]
    waiting = [stream_in_background(app, auth) for _ in range(3)]
    live, finished, cancelled = take_tasks(client, auth("publisher"), session_id, 3)
    foreign_thread, foreign_box = stream_in_background(app, auth, "other-llm")
    [foreign] = take_tasks(client, other_publisher, other_session, 1)

    first = post_session_chunks(client, auth("publisher"), session_id, [
        {"task_id": task_id, "chunks": [{"data": f"{task_id}:0"}], "seq": 0}
        for task_id in (live, finished, cancelled)])
    assert outcomes(first) == [(t, "accepted", None) for t in (live, finished, cancelled)]
    responses, events = {}, {}
    for thread, box in waiting:
        thread.join(5)
        stream = iter(box["value"].response)
        first = next(stream)  # this stream's first event: which task it is
        task_id = first.split(b":")[1].strip().decode()
        responses[task_id], events[task_id] = box["value"], stream
    assert sorted(responses) == sorted((live, finished, cancelled))  # all three streams opened
    responses[cancelled].close()  # that client goes away
    assert post_session_chunks(client, auth("publisher"), session_id, [
        {"task_id": finished, "chunks": [{"data": "[DONE]"}], "seq": 1}]).status_code == 200

    mixed = post_session_chunks(client, auth("publisher"), session_id, [
        {"task_id": live, "chunks": [{"data": f"{live}:1"}], "seq": 1},
        {"task_id": finished, "chunks": [{"data": "more"}], "seq": 2},
        {"task_id": cancelled, "chunks": [{"data": "more"}], "seq": 1},
        {"task_id": foreign, "chunks": [{"data": "not mine"}], "seq": 0},
        {"task_id": "no-such-task", "chunks": [{"data": "x"}]},
        {"task_id": finished, "chunks": [{"data": "[DONE]"}], "seq": 1},  # a retry: accepted
        {"task_id": live, "chunks": [{"data": "[DONE]"}], "seq": 2, "done": True},
    ])
    assert outcomes(mixed) == [
        (live, "accepted", None), (finished, 409, "task_completed"),
        (cancelled, 410, "task_cancelled"), (foreign, 403, "foreign_task"),
        ("no-such-task", 404, "task_not_found"), (finished, "accepted", None),
        (live, "accepted", None)]
    assert set(mixed.json["results"][1]["error"]) == {"status", "code", "message"}
    assert b"".join(events[live]) == f"data: {live}:1\n\ndata: [DONE]\n\n".encode()
    assert b"".join(events[finished]) == b"data: [DONE]\n\n"
    assert {"kind": "cancel", "task_id": cancelled} in poll(
        client, auth("publisher"), session_id).json["tasks"]

    # The foreign task is untouched: its own publisher still streams it.
    assert outcomes(post_session_chunks(client, other_publisher, other_session, [
        {"task_id": foreign, "chunks": [{"data": "theirs"}], "seq": 0, "done": True}])) == [
        (foreign, "accepted", None)]
    foreign_thread.join(5)
    assert foreign_box["value"].get_data() == b"data: theirs\n\ndata: [DONE]\n\n"


def test_session_chunks_carry_sse_event_names(app, client, auth):
    session_id = register(client, auth)["session_id"]
    thread, box = stream_in_background(app, auth)
    [task_id] = take_tasks(client, auth("publisher"), session_id, 1)
    assert outcomes(post_session_chunks(client, auth("publisher"), session_id, [
        {"task_id": task_id, "seq": 0, "done": True, "chunks": [
            {"data": '{"n": 1}', "event": "progress"}, {"data": "\x00odd"}, {"data": "plain"}]},
    ])) == [(task_id, "accepted", None)]
    thread.join(5)
    assert box["value"].get_data() == (b'event: progress\ndata: {"n": 1}\n\n'
                                       b"data: \x00odd\n\ndata: plain\n\ndata: [DONE]\n\n")


def test_session_chunks_are_refused_whole_only_for_the_session_or_a_malformed_body(
        client, auth, other_publisher):
    session_id = register(client, auth)["session_id"]
    ok = [{"task_id": "t", "chunks": []}]
    assert post_session_chunks(client, auth("publisher"), session_id, []).json == {
        "results": []}
    assert post_session_chunks(client, auth("client"), session_id, ok).status_code == 403
    assert post_session_chunks(client, other_publisher, session_id, ok).status_code == 403
    missing = post_session_chunks(client, auth("publisher"), "no-such-session", ok)
    assert (missing.status_code, missing.json["error"]["code"]) == (404, "session_not_found")
    assert client.post(f"/api/v1/publishers/{session_id}/chunks",
                       json={"tasks": []}).status_code == 401
    for body in ({}, {"tasks": {}}, {"tasks": [{"chunks": []}]},
                 {"tasks": [{"task_id": "t", "chunks": "abc"}]},
                 {"tasks": [{"task_id": "t", "chunks": [{"data": 1}]}]},
                 {"tasks": [{"task_id": "t", "chunks": [], "seq": -1}]},
                 {"tasks": [{"task_id": "t", "chunks": [], "done": 1}]},
                 {"tasks": [{"task_id": "t", "chunks": [{"data": "a", "event": "a\nb"}]}]},
                 {"tasks": [{"task_id": "t", "chunks": [], "extra": 1}]},
                 {"tasks": [{"task_id": "t", "chunks": []}] * 257}):
        response = client.post(f"/api/v1/publishers/{session_id}/chunks",
                               headers=auth("publisher"), json=body)
        assert response.status_code == 400, body
    assert outcomes(post_session_chunks(client, auth("publisher"), session_id, ok * 256)) == [
        ("t", 404, "task_not_found")] * 256
