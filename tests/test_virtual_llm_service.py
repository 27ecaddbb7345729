"""Counterparts of the seeds' `virtual-llm-service.test.ts` (22 tests), against a
real SQLite database, the real in-memory bus and the real result route.

The seed's `bindSession` is a live poll here (`bus.touch`), its
`enqueueInferTask` is `relay.infer`, its `completeTask`/`failTask` are the
publisher's POST /tasks/<id>/result.
"""
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import responses
import sqlalchemy as sa

import extensions
from extensions import db
from models import Llm, PublisherSession, utcnow
from services import gc, inference, lifecycle
from services.errors import BadGateway, Conflict, Unavailable
from tests.support.waiting import wait_until


@pytest.fixture
def bus(ctx):
    return ctx.extensions["task_bus"]


@pytest.fixture
def relay(ctx):
    return extensions.relay()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(8) as executor:
        yield executor


def make_llm(**overrides):
    """The seed's makeLlm: an active virtual row of session 's-1'."""
    fields = {"name": "vllm-local", "type": "openai", "model": "m", "url": "", "tier": "fast",
              "kind": "virtual", "provider_session_id": "s-1", "status": "active",
              "last_heartbeat_at": utcnow(), **overrides}
    db.session.add(Llm(**fields))
    db.session.commit()


def bind_session(publisher, bus, session_id):
    """The seed's bindSession: the session exists, is ours, and is polling."""
    if db.session.get(PublisherSession, session_id) is None:
        db.session.add(PublisherSession(id=session_id, owner=publisher.id))
        db.session.commit()
    bus.touch(session_id)


def row(name):
    db.session.expire_all()
    return db.session.scalar(sa.select(Llm).where(Llm.name == name))


def register(publisher, session_id, *llms):
    result = lifecycle.register(db.session, publisher, session_id, list(llms), [], utcnow())
    db.session.commit()
    return result


def start_infer(pool, relay, name, body=None):
    target = inference.resolve(db.session, name)
    db.session.close()
    body = body or {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    return pool.submit(relay.infer, target, body)


def answer(client, auth, task_id, outcome):
    response = client.post(f"/api/v1/tasks/{task_id}/result", json=outcome,
                           headers=auth("publisher"))
    assert response.status_code == 200, response.json
    return response


def poll(bus, session_id, wait=2.0):
    return bus.poll(session_id, wait)


# -- register ---------------------------------------------------------------

def test_register_inserts_new_virtual_rows_active_with_the_session(publisher):
    session_id, llms, _ = register(publisher, None, {
        "name": "vllm-local", "type": "openai", "model": "Qwen/Qwen2.5-7B-Instruct-AWQ",
        "tier": "fast"})
    assert re.fullmatch(r"[0-9a-f]{32}", session_id)
    assert len(llms) == 1
    view = row("vllm-local").view()
    assert (view["kind"], view["status"], view["provider_session_id"]) == (
        "virtual", "active", session_id)
    assert view["last_heartbeat_at"] is not None


def test_register_reuses_the_same_row_on_sticky_reconnect(publisher):
    _, first, _ = register(publisher, "fixed-id", {"name": "vllm-local", "model": "m"})
    first_id = first[0].id
    _, second, _ = register(publisher, "fixed-id", {"name": "vllm-local", "model": "m-updated"})
    assert second[0].id == first_id
    assert row("vllm-local").model == "m-updated"


def test_register_refuses_to_publish_over_a_public_llm(publisher):
    make_llm(name="qwen3-thinking", kind="public", provider_session_id=None)
    with pytest.raises(Conflict, match="Cannot publish over public"):
        register(publisher, "sess-x", {"name": "qwen3-thinking", "model": "m"})


def test_register_refuses_a_name_active_under_another_session(publisher):
    make_llm(name="vllm-local", provider_session_id="other", status="active")
    with pytest.raises(Conflict, match="already active under a different session"):
        register(publisher, "mine", {"name": "vllm-local", "model": "m"})


def test_register_adopts_an_inactive_row_of_another_session(publisher):
    make_llm(name="vllm-local", provider_session_id="old-session", status="inactive",
             inactive_since=utcnow())
    register(publisher, "new-session", {"name": "vllm-local", "model": "m"})
    adopted = row("vllm-local")
    assert (adopted.provider_session_id, adopted.status, adopted.inactive_since) == (
        "new-session", "active", None)


def test_register_with_initial_status_hibernating(publisher):
    register(publisher, "s", {"name": "sleepy", "model": "m", "initial_status": "hibernating"})
    assert row("sleepy").status == "hibernating"


# -- heartbeat and disconnect -------------------------------------------------

def test_heartbeat_bumps_and_revives_an_inactive_row(publisher, bus):
    past = utcnow() - timedelta(seconds=5)
    make_llm(provider_session_id="sess", status="inactive", last_heartbeat_at=past,
             inactive_since=past)
    bind_session(publisher, bus, "sess")
    lifecycle.heartbeat(db.session, publisher, "sess", utcnow())
    db.session.commit()
    revived = row("vllm-local")
    assert (revived.status, revived.inactive_since) == ("active", None)
    assert revived.last_heartbeat_at > past


def test_disconnect_flips_every_owned_row_inactive_at_once(publisher, bus):
    make_llm(name="a", provider_session_id="sess")
    make_llm(name="b", provider_session_id="sess")
    make_llm(name="c", provider_session_id="other")
    bind_session(publisher, bus, "sess")
    lifecycle.disconnect(db.session, publisher, "sess", utcnow())
    db.session.commit()
    assert [row(n).status for n in "abc"] == ["inactive", "inactive", "active"]


# -- enqueue ------------------------------------------------------------------

def test_infer_pushes_an_infer_task_to_the_session(publisher, bus, relay, pool):
    make_llm(provider_session_id="sess")
    bind_session(publisher, bus, "sess")
    future = start_infer(pool, relay, "vllm-local")
    [task] = poll(bus, "sess")
    assert (task["kind"], task["llm"], task["streaming"]) == ("infer", "vllm-local", False)
    assert task["body"]["model"] == "m"  # the row's model replaces the body's
    bus.complete(task["task_id"], {"status": 200, "body": {}})
    future.result(5)


def test_infer_is_refused_when_no_publisher_session_is_live(publisher, relay, pool):
    make_llm(provider_session_id="sess")
    with pytest.raises(Unavailable, match="publisher"):
        start_infer(pool, relay, "vllm-local").result(5)


def test_infer_is_refused_when_the_row_is_inactive(publisher, bus, relay, pool):
    make_llm(provider_session_id="sess", status="inactive", inactive_since=utcnow())
    bind_session(publisher, bus, "sess")
    with pytest.raises(Unavailable, match="inactive"):
        start_infer(pool, relay, "vllm-local").result(5)


@responses.activate
def test_public_llm_goes_to_its_upstream_not_to_a_publisher(publisher, bus, relay, pool):
    make_llm(name="qwen3-thinking", kind="public", provider_session_id=None,
             url="http://upstream.test/v1")
    responses.post("http://upstream.test/v1/chat/completions", json={"ok": True})
    reply = start_infer(pool, relay, "qwen3-thinking").result(5)
    assert reply.status == 200
    assert bus.stats()["tasks"] == 0


def test_result_resolves_the_waiting_request(publisher, bus, relay, pool, client, auth):
    make_llm(provider_session_id="sess")
    bind_session(publisher, bus, "sess")
    future = start_infer(pool, relay, "vllm-local")
    [task] = poll(bus, "sess")
    answer(client, auth, task["task_id"], {"status": 200, "body": {"ok": True}})
    reply = future.result(5)
    assert (reply.status, reply.body) == (200, {"ok": True})


def test_streamed_chunks_reach_the_client_in_order_then_done(publisher, bus, relay, pool,
                                                             client, auth):
    make_llm(provider_session_id="sess")
    bind_session(publisher, bus, "sess")
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    future = start_infer(pool, relay, "vllm-local", body)
    [task] = poll(bus, "sess")
    assert task["streaming"] is True
    for i, data in enumerate(["hello", " world", "[DONE]"]):
        response = client.post(f"/api/v1/tasks/{task['task_id']}/chunks", headers=auth(
            "publisher"), json={"chunks": [{"data": data}], "seq": i})
        assert response.status_code == 200
    reply = future.result(5)
    assert reply.status == 200
    assert b"".join(reply.stream) == b"data: hello\n\ndata:  world\n\ndata: [DONE]\n\n"


def test_publisher_error_fails_the_request_with_its_text(publisher, bus, relay, pool, client,
                                                         auth):
    make_llm(provider_session_id="sess")
    bind_session(publisher, bus, "sess")
    future = start_infer(pool, relay, "vllm-local")
    [task] = poll(bus, "sess")
    answer(client, auth, task["task_id"], {"error": "upstream blew up"})
    with pytest.raises(BadGateway, match="upstream blew up"):
        future.result(5)


def test_disconnect_fails_in_flight_requests(publisher, bus, relay, pool, client, auth):
    make_llm(provider_session_id="sess")
    bind_session(publisher, bus, "sess")
    future = start_infer(pool, relay, "vllm-local")
    poll(bus, "sess")
    assert client.delete("/api/v1/publishers/sess", headers=auth("publisher")).status_code == 204
    with pytest.raises(Unavailable, match="publisher disconnected"):
        future.result(5)


# -- gc sweep -----------------------------------------------------------------

def sweep(now=None):
    result = gc.sweep(db.session, now or utcnow(), heartbeat_timeout=90, retention=4 * 3600)
    db.session.commit()
    return result


def test_gc_flips_heartbeat_stale_rows_inactive(publisher):
    make_llm(name="stale", provider_session_id="a", last_heartbeat_at=utcnow() - timedelta(
        minutes=5))
    make_llm(name="fresh", provider_session_id="b", last_heartbeat_at=utcnow() - timedelta(
        seconds=30))
    assert sweep()["marked_inactive"] == 1
    assert (row("stale").status, row("fresh").status) == ("inactive", "active")


def test_gc_also_flips_stale_hibernating_rows_inactive(publisher):
    make_llm(name="sleeper", status="hibernating",
             last_heartbeat_at=utcnow() - timedelta(minutes=5))
    assert sweep()["llms"]["marked_inactive"] == 1
    assert row("sleeper").status == "inactive"


def test_gc_deletes_rows_inactive_past_retention_and_never_public_ones(publisher):
    make_llm(name="old", provider_session_id="a", status="inactive",
             inactive_since=utcnow() - timedelta(hours=5))
    make_llm(name="recent", provider_session_id="b", status="inactive",
             inactive_since=utcnow() - timedelta(hours=1))
    make_llm(name="public-survivor", kind="public", provider_session_id=None,
             last_heartbeat_at=utcnow() - timedelta(days=9))
    assert sweep()["deleted"] == 1
    assert row("old") is None
    assert row("recent") is not None
    assert row("public-survivor").status == "active"


def test_gc_is_idempotent(publisher):
    make_llm(name="stale", provider_session_id="a", last_heartbeat_at=utcnow() - timedelta(
        minutes=5))
    first, second = sweep(), sweep()
    assert first["marked_inactive"] == 1
    assert (second["marked_inactive"], second["deleted"]) == (0, 0)


# -- wake (v2) ----------------------------------------------------------------

def test_hibernating_row_is_woken_before_the_infer_is_dispatched(publisher, bus, relay, pool,
                                                                 client, auth):
    make_llm(name="sleeping", provider_session_id="sess", status="hibernating")
    bind_session(publisher, bus, "sess")
    future = start_infer(pool, relay, "sleeping")
    [wake] = poll(bus, "sess")
    assert (wake["kind"], wake["llm"]) == ("wake", "sleeping")
    answer(client, auth, wake["task_id"], {"status": 200, "body": {"ok": True}})
    [infer] = poll(bus, "sess")
    assert infer["kind"] == "infer"
    assert row("sleeping").status == "active"
    answer(client, auth, infer["task_id"], {"status": 200, "body": {"n": 1}})
    assert future.result(5).body == {"n": 1}


def test_concurrent_infers_share_one_wake(publisher, bus, relay, pool, client, auth):
    make_llm(name="sleeping", provider_session_id="sess", status="hibernating")
    bind_session(publisher, bus, "sess")
    futures = [start_infer(pool, relay, "sleeping") for _ in range(3)]
    wait_until(lambda: bus.stats()["pending"] == 3, message="all three waiting on the wake")
    wakes = poll(bus, "sess")
    assert [t["kind"] for t in wakes] == ["wake"]
    answer(client, auth, wakes[0]["task_id"], {"status": 200, "body": {"ok": True}})
    infers = []
    while len(infers) < 3:
        infers += poll(bus, "sess")
    assert [t["kind"] for t in infers] == ["infer"] * 3
    for task in infers:
        answer(client, auth, task["task_id"], {"status": 200, "body": {}})
    assert [f.result(5).status for f in futures] == [200, 200, 200]


def test_failed_wake_rejects_every_waiter_and_leaves_the_row_hibernating(
        publisher, bus, relay, pool, client, auth):
    make_llm(name="broken", provider_session_id="sess", status="hibernating")
    bind_session(publisher, bus, "sess")
    futures = [start_infer(pool, relay, "broken") for _ in range(2)]
    wait_until(lambda: bus.stats()["pending"] == 2, message="both waiting on the wake")
    [wake] = poll(bus, "sess")
    answer(client, auth, wake["task_id"], {"error": "wake recipe failed"})
    for future in futures:
        with pytest.raises(BadGateway, match="wake recipe failed"):
            future.result(5)
    assert row("broken").status == "hibernating"
    assert bus.stats()["tasks"] == 0


def test_inactive_row_never_triggers_a_wake(publisher, bus, relay, pool):
    make_llm(name="gone", provider_session_id="sess", status="inactive",
             inactive_since=utcnow())
    bind_session(publisher, bus, "sess")
    with pytest.raises(Unavailable, match="inactive"):
        start_infer(pool, relay, "gone").result(5)
    assert bus.poll("sess", 0) == []
