"""Counterparts of the seed's `chat-service-virtual-llm.test.ts`: a chat with an
agent on a virtual LLM goes through the same relay as `infer`, streamed or
not, with the same status codes when the publisher is offline, hibernating or
slow. The publisher is a thread on the real in-memory bus; the agent and its
LLM are published through services/lifecycle.register.
"""
import json
import threading
import time

import pytest
import sqlalchemy as sa

from extensions import db
from models import ApiToken, Llm, utcnow
from services import lifecycle
from services.tokens import Caller

API = "/api/v1"
SESSION = "sess-1"


class FakePublisher:
    """Polls the session on the bus and answers each task with `handler(bus, task)`."""

    def __init__(self, bus, handler, session_id=SESSION):
        self.bus, self.handler, self.session_id = bus, handler, session_id
        self.tasks = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        while not self._stop.is_set():
            for task in self.bus.poll(self.session_id, 0.2):
                self.tasks.append(task)
                if task["kind"] != "cancel":
                    self.handler(self.bus, task)


def completion(content):
    return {"object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]}


def chunk(content):
    return json.dumps({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"content": content}}]})


def answer_with(content):
    def handler(bus, task):
        bus.complete(task["task_id"], {"status": 200, "body": completion(content)})
    return handler


def stream_words(*words):
    def handler(bus, task):
        bus.push_chunks(task["task_id"], [chunk(w) for w in words] + ["[DONE]"], 0, True)
    return handler


@pytest.fixture
def app_config():
    return {"TASK_PICKUP_TIMEOUT": 1.0, "STREAM_KEEPALIVE": 0.5}


@pytest.fixture
def bus(app):
    return app.extensions["task_bus"]


@pytest.fixture
def published(app, tokens, bus):
    """A virtual LLM 'vllm-local' and agent 'local-coder' of session SESSION,
    registered like the publisher's payload does, with a live poll."""
    def publish(initial_status="active"):
        with app.app_context():
            token = db.session.scalar(sa.select(ApiToken).where(ApiToken.role == "publisher"))
            caller = Caller(id=token.id, name=token.name, role=token.role)
            lifecycle.register(
                db.session, caller, SESSION,
                [{"name": "vllm-local", "type": "openai", "model": "qwen-local",
                  "initial_status": initial_status}],
                [{"name": "local-coder", "llm": "vllm-local",
                  "system_prompt": "You are a helpful agent.",
                  "default_params": {"temperature": 0.1}}], utcnow())
            db.session.commit()
        bus.touch(SESSION)
    return publish


@pytest.fixture
def chat(client, auth):
    def call(body):
        return client.post(f"{API}/agents/local-coder/chat", json=body, headers=auth("client"))
    return call


@pytest.fixture
def last_assistant(client, auth):
    def read():
        threads = client.get(f"{API}/agents/local-coder/threads", headers=auth("client")).json
        stored = client.get(f"{API}/threads/{threads[0]['id']}/messages",
                            headers=auth("client")).json
        return stored[0]["status"], stored[-1]["status"], stored[-1]["content"]
    return read


def events_of(response):
    text = response.get_data(as_text=True)
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


# -- the seed's four ---------------------------------------------------------------

def test_non_streaming_chat_is_relayed_through_the_publisher(published, bus, chat):
    published()
    with FakePublisher(bus, answer_with("hello back from local")) as publisher:
        response = chat({"message": "hi"})
    assert response.status_code == 200, response.json
    assert response.json["assistant"] == "hello back from local"
    (task,) = publisher.tasks
    assert (task["kind"], task["llm"], task["streaming"]) == ("infer", "vllm-local", False)
    assert task["body"]["model"] == "qwen-local"
    assert task["body"]["temperature"] == 0.1
    assert task["body"]["messages"] == [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "hi"}]


def test_streaming_chat_is_relayed_and_emits_the_same_text_deltas(published, bus, chat):
    published()
    with FakePublisher(bus, stream_words("hello ", "world")) as publisher:
        response = chat({"message": "hi", "stream": True})
        events = events_of(response)
    deltas = [e["delta"] for e in events if e["type"] == "text"]
    assert "".join(deltas) == "hello world"
    assert events[-1]["type"] == "final"
    (task,) = publisher.tasks
    assert task["streaming"] is True and task["body"]["stream"] is True


def test_without_a_live_publisher_the_chat_is_503_not_a_call_to_an_empty_url(
        app, published, bus, chat, last_assistant):
    """The seed's 'virtualLlms dispatcher not wired': here the relay is always
    wired, and a virtual row with no live session fails clearly."""
    published()
    bus.drop_session(SESSION, "gone")  # registered, but nobody polls
    response = chat({"message": "hi"})
    assert response.status_code == 503
    assert response.json["error"]["code"] == "publisher_offline"
    assert last_assistant() == ("complete", "error", "")


def test_the_relays_rejection_reaches_the_caller(published, bus, chat, last_assistant):
    published()

    def disconnect(bus, task):
        bus.drop_session(SESSION, "publisher disconnected")

    with FakePublisher(bus, disconnect):
        response = chat({"message": "hi"})
    assert response.status_code == 503
    assert "publisher disconnected" in response.json["error"]["message"]
    assert last_assistant() == ("complete", "error", "")


# -- the same status codes as infer --------------------------------------------------

def test_a_publisher_error_result_is_502_with_its_text(published, bus, chat, last_assistant):
    published()

    def fail(bus, task):
        bus.complete(task["task_id"], {"error": "CUDA out of memory"})

    with FakePublisher(bus, fail):
        response = chat({"message": "hi"})
    assert response.status_code == 502
    assert "CUDA out of memory" in response.json["error"]["message"]
    assert last_assistant() == ("complete", "error", "")


def test_an_inactive_virtual_llm_is_503_no_task_is_queued_and_nothing_stored(
        app, client, auth, published, bus, chat):
    published()
    with app.app_context():
        db.session.execute(sa.update(Llm).values(status="inactive", inactive_since=utcnow()))
        db.session.commit()
    with FakePublisher(bus, answer_with("never")) as publisher:
        response = chat({"message": "hi"})
    assert response.status_code == 503
    assert response.json["error"]["code"] == "publisher_offline"
    assert publisher.tasks == []
    assert client.get(f"{API}/agents/local-coder/threads", headers=auth("client")).json == []


def test_a_disconnected_publishers_agent_is_503_and_nothing_stored(client, auth, published,
                                                                   chat):
    published()
    client.delete(f"{API}/publishers/{SESSION}", headers=auth("publisher"))
    response = chat({"message": "hi"})
    assert response.status_code == 503
    assert "inactive" in response.json["error"]["message"]
    assert client.get(f"{API}/agents/local-coder/threads", headers=auth("client")).json == []


def test_a_hibernating_llm_is_woken_once_before_the_chat_is_relayed(published, bus, chat):
    published(initial_status="hibernating")

    def handler(bus, task):
        if task["kind"] == "wake":
            bus.complete(task["task_id"], {"status": 200, "body": {"ok": True}})
        else:
            answer_with("awake now")(bus, task)

    with FakePublisher(bus, handler) as publisher:
        response = chat({"message": "wake up"})
    assert response.json["assistant"] == "awake now"
    assert [t["kind"] for t in publisher.tasks] == ["wake", "infer"]


def test_a_failed_wake_is_502_and_the_turn_is_an_error(published, bus, chat, last_assistant):
    published(initial_status="hibernating")

    def handler(bus, task):
        bus.complete(task["task_id"], {"error": "wake recipe failed"})

    with FakePublisher(bus, handler):
        response = chat({"message": "wake up"})
    assert response.status_code == 502
    assert response.json["error"]["code"] == "wake_failed"
    assert last_assistant() == ("complete", "error", "")


def test_a_publisher_that_never_picks_up_is_504(published, chat, last_assistant):
    published()  # live (just registered) but nobody polls: TASK_PICKUP_TIMEOUT is 1 s
    started = time.monotonic()
    response = chat({"message": "hi"})
    assert response.status_code == 504
    assert time.monotonic() - started < 5
    assert last_assistant() == ("complete", "error", "")


def test_a_publisher_vanishing_mid_stream_ends_it_with_an_error_event(
        published, bus, chat, last_assistant):
    published()

    def half(bus, task):
        bus.push_chunks(task["task_id"], [chunk("half ")], 0, False)
        time.sleep(0.1)
        bus.drop_session(SESSION, "publisher disconnected")

    with FakePublisher(bus, half):
        events = events_of(chat({"message": "hi", "stream": True}))
    assert events[0] == {"type": "text", "delta": "half "}
    assert events[-1]["type"] == "error"
    assert "publisher disconnected" in events[-1]["error"]["message"]
    assert last_assistant() == ("complete", "error", "half ")


def test_a_streamed_chat_answered_whole_still_streams_text_then_final(published, bus, chat):
    published()
    with FakePublisher(bus, answer_with("whole answer")):
        events = events_of(chat({"message": "hi", "stream": True}))
    assert [e["type"] for e in events] == ["text", "final"]
    assert events[0]["delta"] == "whole answer"


def test_the_bus_drains_after_chats(published, bus, chat):
    published()
    with FakePublisher(bus, stream_words("a")):
        events_of(chat({"message": "hi", "stream": True}))
    with FakePublisher(bus, answer_with("b")):
        chat({"message": "hi"})
    stats = bus.stats()
    assert (stats["tasks"], stats["pending"], stats["queued"]) == (0, 0, 0)
