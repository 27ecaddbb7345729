"""Chat with a public agent: context, params, history, failures, streams,
tool calls, thread privacy, and agents through /v1. The upstream is faked
with `responses`; the database is the test stack's (SQLite or PostgreSQL)."""
import io
import json

import pytest
import requests
import responses
import sqlalchemy as sa
from gevent import GreenletExit

from extensions import db
from services import database
from services import tokens as token_service
from tests.support.database import WriteLock, other_connection

API = "/api/v1"
UPSTREAM = "http://upstream.test/v1/chat/completions"


def completion(content="hello", tool_calls=None, usage=None):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "c1", "object": "chat.completion", "model": "gpt-x",
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if tool_calls else "stop"}],
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def sse(*chunks, done=True):
    events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


def delta(content=None, finish=None, **fields):
    d = {"content": content} if content is not None else {}
    d.update(fields)
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def sent(call) -> dict:
    return json.loads(call.request.body)


@pytest.fixture
def admin(client, auth):
    def call(method, path, json=None):
        response = client.open(API + path, method=method, json=json, headers=auth("admin"))
        assert response.status_code < 300, response.json
        return response.json
    return call


@pytest.fixture
def agent(admin):
    """'reviewer' on public LLM 'up', with a default personality 'calm'."""
    admin("POST", "/llms", {"name": "up", "model": "gpt-x", "url": "http://upstream.test/v1",
                            "api_key": "sk-up"})
    admin("POST", "/agents", {"name": "reviewer", "llm": "up",
                              "system_prompt": "You review diffs.",
                              "default_params": {"temperature": 0.2, "max_tokens": 64}})
    admin("POST", "/prompts", {"name": "calm", "content": "Stay calm."})
    admin("POST", "/prompts", {"name": "blunt", "content": "Be blunt."})
    admin("POST", "/agents/reviewer/personalities", {"name": "calm", "prompts": ["calm"]})
    admin("POST", "/agents/reviewer/personalities", {"name": "blunt", "prompts": ["blunt"]})
    admin("PATCH", "/agents/reviewer", {"default_personality": "calm"})
    return "reviewer"


@pytest.fixture
def chat(client, auth):
    def call(body, role="client", headers=None, name="reviewer", **kwargs):
        return client.post(f"{API}/agents/{name}/chat", json=body,
                           headers=headers or auth(role), **kwargs)
    return call


@pytest.fixture
def messages(client, auth):
    def call(thread_id):
        response = client.get(f"{API}/threads/{thread_id}/messages", headers=auth("admin"))
        return [(m["role"], m["content"], m["status"]) for m in response.json]
    return call


@pytest.fixture
def second_client(app):
    with app.app_context():
        raw = token_service.create_token(db.session, "client-2", "client")
        db.session.commit()
    return {"Authorization": f"Bearer {raw}"}


def events_of(response) -> list[dict]:
    text = response.get_data(as_text=True)
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


# -- context and params ---------------------------------------------------------

def test_chat_sends_system_prompt_default_personality_and_merged_params(agent, chat, upstream):
    upstream.post(UPSTREAM, json=completion("LGTM"))
    response = chat({"message": "Review this.", "params": {"temperature": 0.9}})
    assert response.status_code == 200, response.json
    body = sent(upstream.calls[0])
    assert body["messages"] == [
        {"role": "system", "content": "You review diffs.\n\nStay calm."},
        {"role": "user", "content": "Review this."}]
    assert (body["temperature"], body["max_tokens"], body["model"]) == (0.9, 64, "gpt-x")
    assert upstream.calls[0].request.headers["Authorization"] == "Bearer sk-up"


def test_chat_answers_with_thread_message_assistant_and_usage(agent, chat, upstream, messages):
    upstream.post(UPSTREAM, json=completion("LGTM", usage={"total_tokens": 6}))
    answer = chat({"message": "Review this."}).json
    assert answer["assistant"] == "LGTM"
    assert answer["usage"] == {"total_tokens": 6}
    assert answer["tool_calls"] is None
    assert messages(answer["thread_id"]) == [("user", "Review this.", "complete"),
                                             ("assistant", "LGTM", "complete")]


def test_requested_personality_replaces_the_default_one(agent, chat, upstream):
    upstream.post(UPSTREAM, json=completion())
    chat({"message": "hi", "personality": "blunt"})
    assert sent(upstream.calls[0])["messages"][0]["content"] == "You review diffs.\n\nBe blunt."


def test_a_null_param_removes_the_agents_default(agent, chat, upstream):
    upstream.post(UPSTREAM, json=completion())
    chat({"message": "hi", "params": {"max_tokens": None}})
    assert "max_tokens" not in sent(upstream.calls[0])


def test_chat_params_cannot_replace_the_messages(agent, chat):
    response = chat({"message": "hi", "params": {"messages": []}})
    assert response.status_code == 400


def test_unknown_personality_is_404_and_stores_nothing(agent, client, auth, chat):
    response = chat({"message": "hi", "personality": "nope"})
    assert response.status_code == 404
    assert client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json == []


def test_chat_with_an_unknown_agent_is_404(chat):
    assert chat({"message": "hi"}, name="nope").status_code == 404


def test_chat_keeps_history_across_turns(agent, chat, upstream, messages):
    upstream.post(UPSTREAM, json=completion("first answer"))
    upstream.post(UPSTREAM, json=completion("second answer"))
    thread_id = chat({"message": "first"}).json["thread_id"]
    chat({"message": "second", "thread_id": thread_id})
    assert sent(upstream.calls[1])["messages"][1:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"}]
    assert [turn[:2] for turn in messages(thread_id)] == [
        ("user", "first"), ("assistant", "first answer"),
        ("user", "second"), ("assistant", "second answer")]


def test_chat_without_thread_id_starts_a_thread_titled_by_the_message(
        agent, client, auth, chat, upstream):
    upstream.post(UPSTREAM, json=completion())
    thread_id = chat({"message": "Please   review\nmy diff"}).json["thread_id"]
    thread = client.get(f"{API}/threads/{thread_id}", headers=auth("client")).json
    assert thread["title"] == "Please review my diff"
    assert thread["last_turn_at"] is not None


# -- the transaction around inference ------------------------------------------

def test_user_message_is_committed_before_inference_and_no_connection_is_held(
        app, agent, chat, upstream):
    seen = {}

    def answer(request):
        with other_connection(app) as other:  # another connection sees only committed rows
            seen["rows"] = [tuple(row) for row in other.execute(sa.text(
                "SELECT role, content, status FROM chat_message ORDER BY turn_index"))]
        with app.app_context():
            seen["checked_out"] = db.engine.pool.checkedout()
        return 200, {}, json.dumps(completion("ok"))

    upstream.add_callback(responses.POST, UPSTREAM, callback=answer)
    assert chat({"message": "hi"}).status_code == 200
    assert seen["rows"] == [("user", "hi", "complete"), ("assistant", "", "pending")]
    assert seen["checked_out"] == 0


def test_failed_inference_leaves_the_user_message_and_an_error_message(
        agent, client, auth, chat, upstream, messages):
    upstream.post(UPSTREAM, status=500, json={"error": {"message": "GPU on fire"}})
    response = chat({"message": "hi"})
    assert response.status_code == 502
    assert "500: GPU on fire" in response.json["error"]["message"]
    thread_id = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json[0]["id"]
    assert messages(thread_id) == [("user", "hi", "complete"), ("assistant", "", "error")]
    stored = client.get(f"{API}/threads/{thread_id}/messages", headers=auth("client")).json
    assert "GPU on fire" in stored[1]["error"]


def test_unreachable_upstream_is_502_and_an_error_message(agent, client, auth, chat, upstream,
                                                          messages):
    upstream.post(UPSTREAM, body=requests.ConnectionError("refused"))
    response = chat({"message": "hi"})
    assert response.status_code == 502
    assert response.json["error"]["code"] == "upstream_unreachable"
    thread_id = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json[0]["id"]
    assert messages(thread_id)[-1] == ("assistant", "", "error")


def test_upstream_400_keeps_its_status_and_message(agent, chat, upstream):
    upstream.post(UPSTREAM, status=400, json={"error": {"message": "top_k is not supported"}})
    response = chat({"message": "hi"})
    assert response.status_code == 400
    assert response.json["error"]["details"] == {"upstream_status": 400}
    assert "top_k is not supported" in response.json["error"]["message"]


def test_a_completion_without_choices_is_502(agent, chat, upstream):
    upstream.post(UPSTREAM, json={"object": "chat.completion", "choices": []})
    assert chat({"message": "hi"}).status_code == 502


def test_a_failed_turn_in_a_thread_is_skipped_by_the_next_turn(agent, chat, upstream):
    upstream.post(UPSTREAM, json=completion("one"))
    upstream.post(UPSTREAM, status=500, json={"error": "boom"})
    upstream.post(UPSTREAM, json=completion("three"))
    thread_id = chat({"message": "1"}).json["thread_id"]
    assert chat({"message": "2", "thread_id": thread_id}).status_code == 502
    chat({"message": "3", "thread_id": thread_id})
    # The failed turn's question stays, its error does not; roles still alternate.
    assert [(m["role"], m["content"]) for m in sent(upstream.calls[2])["messages"][1:]] == [
        ("user", "1"), ("assistant", "one"), ("user", "2\n\n3")]


# -- storing the answer while another process holds the database -----------------

BUSY = pytest.mark.parametrize("app_config", [{"SQLITE_BUSY_TIMEOUT": 0.2,
                                                "DATABASE_LOCK_TIMEOUT": 0.2}])


@pytest.fixture
def write_lock(app):
    """The database's write lock from another connection, as a cron gc-sweep
    holds SQLite's (on PostgreSQL: every table locked against writes)."""
    lock = WriteLock(app)
    yield lock
    lock.close()


def answer_while_locked(lock, reply):
    """An upstream callback that takes the lock, then answers `reply`."""
    def callback(request):
        lock.take()
        return 200, {"Content-Type": reply[0]}, reply[1]
    return callback


@BUSY
def test_an_answer_is_stored_once_the_busy_database_frees_up(app, agent, chat, upstream,
                                                            messages, write_lock):
    busy = []

    def release_on_busy(context):  # the first attempt waited out the lock timeout
        if database.is_busy(context.original_exception):
            busy.append(context.original_exception)
            write_lock.release()

    upstream.add_callback(responses.POST, UPSTREAM, callback=answer_while_locked(
        write_lock, ("application/json", json.dumps(completion("kept")))))
    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "handle_error", release_on_busy)
    try:
        response = chat({"message": "hi"})
    finally:
        sa.event.remove(engine, "handle_error", release_on_busy)
    assert busy
    assert response.status_code == 200, response.json
    assert (response.json["assistant"], response.json["saved"]) == ("kept", True)
    assert messages(response.json["thread_id"])[-1] == ("assistant", "kept", "complete")


@BUSY
def test_an_answer_the_busy_database_never_takes_is_returned_marked_unsaved(
        agent, chat, upstream, messages, write_lock):
    upstream.add_callback(responses.POST, UPSTREAM, callback=answer_while_locked(
        write_lock, ("application/json", json.dumps(completion("paid for")))))
    response = chat({"message": "hi"})
    write_lock.release()
    assert response.status_code == 200, response.json
    assert (response.json["assistant"], response.json["saved"]) == ("paid for", False)
    assert messages(response.json["thread_id"])[-1] == ("assistant", "", "pending")


@BUSY
def test_a_streamed_answer_the_busy_database_never_takes_ends_with_an_error_not_final(
        agent, chat, upstream, messages, write_lock):
    upstream.add_callback(responses.POST, UPSTREAM, callback=answer_while_locked(
        write_lock, ("text/event-stream", sse(delta("paid "), delta("for"), delta(finish="stop")))))
    events = events_of(chat({"message": "hi", "stream": True}))
    write_lock.release()
    assert [e["type"] for e in events] == ["text", "text", "error"]
    assert events[-1]["error"]["code"] == "answer_not_saved"
    assert messages(events[-1]["thread_id"])[-1] == ("assistant", "", "pending")


def test_an_answer_whose_message_was_settled_meanwhile_is_returned_marked_unsaved(
        app, agent, chat, upstream, messages):
    def settle_then_answer(request):  # as the sweep does with a long-pending message
        with other_connection(app) as other:
            other.execute(sa.text(
                "UPDATE chat_message SET status = 'error' WHERE status = 'pending'"))
        return 200, {}, json.dumps(completion("too late"))

    upstream.add_callback(responses.POST, UPSTREAM, callback=settle_then_answer)
    response = chat({"message": "hi"})
    assert (response.json["assistant"], response.json["saved"]) == ("too late", False)
    assert messages(response.json["thread_id"])[-1] == ("assistant", "", "error")


# -- a greenlet stopped mid-turn (GreenletExit, gevent.Timeout) ------------------

class StoppedAfter(io.RawIOBase):
    """An upstream body that delivers `data`, then has its greenlet killed."""

    def __init__(self, data):
        self.data = data

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.data:
            raise GreenletExit
        size = min(len(buffer), len(self.data))
        buffer[:size], self.data = self.data[:size], self.data[size:]
        return size


def test_a_greenlet_stopped_while_the_upstream_works_stores_error_and_stops(
        agent, client, auth, chat, upstream, messages):
    def killed(request):
        raise GreenletExit

    upstream.add_callback(responses.POST, UPSTREAM, callback=killed)
    with pytest.raises(GreenletExit):
        chat({"message": "hi"})
    thread_id = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json[0]["id"]
    assert messages(thread_id)[-1] == ("assistant", "", "error")


def test_a_greenlet_stopped_mid_stream_stores_error_with_what_arrived_and_stops(
        agent, client, auth, chat, upstream, messages):
    upstream.post(UPSTREAM, content_type="text/event-stream",
                  body=io.BufferedReader(StoppedAfter(sse(delta("par"), done=False))))
    response = chat({"message": "hi", "stream": True}, buffered=False)
    with pytest.raises(GreenletExit):
        response.get_data()
    thread_id = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json[0]["id"]
    assert messages(thread_id)[-1] == ("assistant", "par", "error")


# -- tool calls -----------------------------------------------------------------

TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "read_file", "arguments": "{\"path\": \"a.py\"}"}}


def test_tool_calls_are_stored_on_the_assistant_message_and_returned(
        agent, client, auth, chat, upstream):
    upstream.post(UPSTREAM, json=completion(None, tool_calls=[TOOL_CALL]))
    answer = chat({"message": "read a.py", "params": {"tools": [{"type": "function"}]}}).json
    assert answer["tool_calls"] == [TOOL_CALL]
    assert answer["assistant"] == ""
    stored = client.get(f"{API}/threads/{answer['thread_id']}/messages",
                        headers=auth("client")).json
    assert stored[1]["tool_calls"] == [TOOL_CALL]
    assert stored[1]["status"] == "complete"


def test_tool_results_answer_the_tool_calls_in_the_next_turn(agent, chat, upstream):
    upstream.post(UPSTREAM, json=completion(None, tool_calls=[TOOL_CALL]))
    upstream.post(UPSTREAM, json=completion("a.py looks fine"))
    thread_id = chat({"message": "read a.py"}).json["thread_id"]
    answer = chat({"thread_id": thread_id,
                   "tool_results": [{"tool_call_id": "call_1", "content": "print(1)"}]})
    assert answer.json["assistant"] == "a.py looks fine"
    assert sent(upstream.calls[1])["messages"][1:] == [
        {"role": "user", "content": "read a.py"},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "print(1)", "tool_call_id": "call_1"}]


def test_tool_results_without_a_thread_are_400(agent, chat):
    response = chat({"tool_results": [{"tool_call_id": "call_1", "content": "x"}]})
    assert response.status_code == 400


def test_chat_needs_a_message_or_tool_results(agent, chat):
    assert chat({"thread_id": "x"}).status_code == 400


OTHER_CALL = {"id": "call_2", "type": "function",
              "function": {"name": "read_file", "arguments": "{\"path\": \"b.py\"}"}}


@pytest.fixture
def waiting_thread(agent, chat, upstream):
    """A thread whose last answer asked for tool calls call_1 and call_2."""
    upstream.post(UPSTREAM, json=completion(None, tool_calls=[TOOL_CALL, OTHER_CALL]))
    return chat({"message": "read a.py and b.py"}).json["thread_id"]


def test_a_message_while_tool_calls_wait_for_results_is_400_and_stores_nothing(
        waiting_thread, chat, messages):
    response = chat({"thread_id": waiting_thread, "message": "never mind"})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "tool_results_required"
    assert response.json["error"]["details"] == {"missing": ["call_1", "call_2"]}
    assert len(messages(waiting_thread)) == 2


def test_tool_results_missing_a_waiting_call_are_400_naming_it(waiting_thread, chat):
    response = chat({"thread_id": waiting_thread,
                     "tool_results": [{"tool_call_id": "call_1", "content": "print(1)"}]})
    assert response.status_code == 400
    assert response.json["error"]["details"] == {"missing": ["call_2"]}
    assert "missing call_2" in response.json["error"]["message"]


def test_tool_results_with_an_unknown_tool_call_id_are_400_naming_it(waiting_thread, chat):
    response = chat({"thread_id": waiting_thread, "tool_results": [
        {"tool_call_id": "call_1", "content": "print(1)"},
        {"tool_call_id": "call_2", "content": "print(2)"},
        {"tool_call_id": "call_9", "content": "?"}]})
    assert response.status_code == 400
    assert response.json["error"]["details"] == {"unknown": ["call_9"]}
    assert "unknown call_9" in response.json["error"]["message"]


def test_tool_results_answering_a_call_twice_are_400_naming_it(waiting_thread, chat):
    response = chat({"thread_id": waiting_thread, "tool_results": [
        {"tool_call_id": "call_1", "content": "print(1)"},
        {"tool_call_id": "call_2", "content": "print(2)"},
        {"tool_call_id": "call_1", "content": "print(1) again"}]})
    assert response.status_code == 400
    assert response.json["error"]["details"] == {"duplicate": ["call_1"]}
    assert "duplicate call_1" in response.json["error"]["message"]


def test_tool_results_when_no_tool_call_waits_are_400(agent, chat, upstream, messages):
    upstream.post(UPSTREAM, json=completion("plain answer"))
    thread_id = chat({"message": "hi"}).json["thread_id"]
    response = chat({"thread_id": thread_id,
                     "tool_results": [{"tool_call_id": "call_1", "content": "x"}]})
    assert response.status_code == 400
    assert response.json["error"]["details"] == {"unknown": ["call_1"]}
    assert len(messages(thread_id)) == 2


def test_tool_results_of_a_failed_turn_still_answer_the_calls(waiting_thread, chat, upstream):
    upstream.post(UPSTREAM, status=500, json={"error": "boom"})
    upstream.post(UPSTREAM, json=completion("both fine"))
    results = [{"tool_call_id": "call_1", "content": "print(1)"},
               {"tool_call_id": "call_2", "content": "print(2)"}]
    assert chat({"thread_id": waiting_thread, "tool_results": results}).status_code == 502
    assert chat({"thread_id": waiting_thread, "message": "go on"}).status_code == 200
    assert [m["role"] for m in sent(upstream.calls[2])["messages"][1:]] == [
        "user", "assistant", "tool", "tool", "user"]


# -- streaming ------------------------------------------------------------------

def test_streamed_chat_emits_text_deltas_then_final_and_stores_the_answer(
        agent, chat, upstream, messages):
    upstream.post(UPSTREAM, content_type="text/event-stream", body=sse(
        delta("Hello "), delta("world"), delta(finish="stop")))
    response = chat({"message": "hi", "stream": True})
    assert response.status_code == 200
    assert response.content_type == "text/event-stream"
    events = events_of(response)
    assert events[:2] == [{"type": "text", "delta": "Hello "}, {"type": "text", "delta": "world"}]
    final = events[2]
    assert final["type"] == "final" and len(events) == 3
    assert messages(final["thread_id"])[-1] == ("assistant", "Hello world", "complete")
    assert sent(upstream.calls[0])["stream"] is True


def test_streamed_tool_call_deltas_are_assembled_and_stored(agent, client, auth, chat, upstream):
    upstream.post(UPSTREAM, content_type="text/event-stream", body=sse(
        delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "read_file", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": "{\"path\": "}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": "\"a.py\"}"}}]),
        delta(finish="tool_calls")))
    final = events_of(chat({"message": "read a.py", "stream": True}))[-1]
    assert final["tool_calls"] == [TOOL_CALL]
    stored = client.get(f"{API}/threads/{final['thread_id']}/messages",
                        headers=auth("client")).json
    assert stored[-1]["tool_calls"] == [TOOL_CALL]


def test_a_stream_ending_early_stores_error_with_what_arrived(agent, chat, upstream, messages,
                                                             client, auth):
    upstream.post(UPSTREAM, content_type="text/event-stream",
                  body=sse(delta("Hel"), done=False))
    events = events_of(chat({"message": "hi", "stream": True}))
    assert events[0] == {"type": "text", "delta": "Hel"}
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "stream_incomplete"
    assert messages(events[-1]["thread_id"])[-1] == ("assistant", "Hel", "error")


def test_an_error_event_in_the_stream_stores_error(agent, chat, upstream, messages):
    error = {"error": {"message": "upstream broke", "type": "upstream_error",
                       "code": "upstream_stream_broken"}}
    upstream.post(UPSTREAM, content_type="text/event-stream",
                  body=sse(delta("par"), error, done=False))
    events = events_of(chat({"message": "hi", "stream": True}))
    assert events[-1]["error"]["message"] == "upstream broke"
    assert messages(events[-1]["thread_id"])[-1] == ("assistant", "par", "error")


def test_a_client_leaving_a_stream_stores_error(agent, client, auth, chat, upstream, messages):
    upstream.post(UPSTREAM, content_type="text/event-stream", body=sse(
        delta("one "), delta("two"), delta(finish="stop")))
    response = chat({"message": "hi", "stream": True}, buffered=False)
    first = next(iter(response.response))
    assert b"one" in first
    response.close()
    thread_id = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json[0]["id"]
    assert messages(thread_id)[-1] == ("assistant", "one ", "error")


def test_a_streamed_chat_refused_upstream_is_an_http_error(agent, chat, upstream, messages,
                                                           client, auth):
    upstream.post(UPSTREAM, status=429, json={"error": {"message": "slow down"}})
    response = chat({"message": "hi", "stream": True})
    assert response.status_code == 429
    assert response.json["error"]["type"] == "rate_limit_error"
    thread_id = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json[0]["id"]
    assert messages(thread_id)[-1] == ("assistant", "", "error")


# -- threads and who sees them ---------------------------------------------------

def test_client_sees_only_its_own_threads_and_admin_sees_all(
        agent, client, auth, second_client):
    mine = client.post(f"{API}/agents/reviewer/threads", json={"title": "mine"},
                       headers=auth("client"))
    assert mine.status_code == 201
    client.post(f"{API}/agents/reviewer/threads", json={"title": "theirs"},
                headers=second_client)
    listed = client.get(f"{API}/agents/reviewer/threads", headers=auth("client")).json
    assert [t["title"] for t in listed] == ["mine"]
    every = client.get(f"{API}/agents/reviewer/threads", headers=auth("admin")).json
    assert sorted(t["title"] for t in every) == ["mine", "theirs"]


def test_another_clients_thread_is_403_to_read_and_to_chat_in(
        agent, client, auth, chat, second_client):
    theirs = client.post(f"{API}/agents/reviewer/threads", json={},
                         headers=second_client).json["id"]
    assert client.get(f"{API}/threads/{theirs}/messages",
                      headers=auth("client")).status_code == 403
    assert chat({"message": "hi", "thread_id": theirs}).status_code == 403
    assert client.delete(f"{API}/threads/{theirs}", headers=auth("client")).status_code == 403
    assert client.get(f"{API}/threads/{theirs}/messages", headers=auth("admin")).status_code == 200


def test_a_thread_of_another_agent_is_404_for_this_agent(agent, admin, client, auth, chat):
    admin("POST", "/agents", {"name": "other", "llm": "up"})
    thread = client.post(f"{API}/agents/other/threads", json={}, headers=auth("client")).json
    assert chat({"message": "hi", "thread_id": thread["id"]}).status_code == 404


def test_an_unknown_thread_is_404(agent, client, auth):
    assert client.get(f"{API}/threads/nope/messages", headers=auth("client")).status_code == 404


def test_a_publisher_may_neither_chat_nor_read_threads(agent, client, auth, chat):
    assert chat({"message": "hi"}, role="publisher").status_code == 403
    assert client.get(f"{API}/agents/reviewer/threads",
                      headers=auth("publisher")).status_code == 403


def test_deleting_a_thread_deletes_its_messages(agent, client, auth, chat, upstream):
    upstream.post(UPSTREAM, json=completion())
    thread_id = chat({"message": "hi"}).json["thread_id"]
    assert client.delete(f"{API}/threads/{thread_id}", headers=auth("client")).status_code == 204
    assert client.get(f"{API}/threads/{thread_id}/messages",
                      headers=auth("admin")).status_code == 404


# -- agents through /v1 ------------------------------------------------------------

def test_v1_models_lists_usable_agents_with_the_agent_prefix(app, agent, admin, client, auth):
    from models import Agent, Status

    admin("POST", "/agents", {"name": "gone", "llm": "up"})
    with app.app_context():
        db.session.execute(db.update(Agent).where(Agent.name == "gone")
                           .values(kind="virtual", status=Status.INACTIVE))
        db.session.commit()
    ids = [m["id"] for m in client.get("/v1/models", headers=auth("client")).json["data"]]
    assert ids == ["up", "pool:gpt-x", "agent:reviewer"]


def test_v1_chat_completions_through_an_agent_applies_its_persona(agent, client, auth, upstream):
    upstream.post(UPSTREAM, json=completion("hi there"))
    response = client.post("/v1/chat/completions", headers=auth("client"), json={
        "model": "agent:reviewer", "temperature": 0.7,
        "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 200
    assert response.json["choices"][0]["message"]["content"] == "hi there"
    body = sent(upstream.calls[0])
    assert body["messages"] == [{"role": "system", "content": "You review diffs.\n\nStay calm."},
                                {"role": "user", "content": "hello"}]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-x", 0.7, 64)


def test_v1_chat_completions_with_an_unknown_agent_is_404(client, auth):
    response = client.post("/v1/chat/completions", headers=auth("client"), json={
        "model": "agent:nope", "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 404
