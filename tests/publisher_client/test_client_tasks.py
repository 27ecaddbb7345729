"""Running tasks: infer (plain and streamed) against the backends, posting
results and chunk batches, cancel and 410, max_concurrency, wake first."""
import gzip
import json
import socket
import threading
import time

import pytest
import requests
import responses

from publisher_client import Publisher, backends
from publisher_client.backends import Aborted, Answer, Call, OpenAIBackend
from publisher_client.config import LlmConfig
from tests.publisher_client.helpers import (API, BACKEND, FixedAnswerBackend, LateHeadersBackend,
                                            SlowStreamBackend, calls_to, expect_result,
                                            sent_json, wait_for)

BODY = {"model": "qwen", "messages": [{"role": "user", "content": "hello there"}]}
COMPLETION = {"object": "chat.completion",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}


@pytest.fixture
def publisher(make_config):
    """publisher(**llm_fields) → a Publisher of one LLM `vllm-local`
    (openai at BACKEND unless the fields say otherwise), already "registered"."""
    made = []

    def make(**fields):
        llm = {"name": "vllm-local", "type": "openai", "url": BACKEND, "model": "qwen", **fields}
        publisher = Publisher(make_config(llms=[llm]))
        publisher.session_id = "sess-1"
        made.append(publisher)
        return publisher
    yield make
    for publisher in made:
        publisher.stopping.set()


def infer(task_id="t1", streaming=False, body=BODY, llm="vllm-local"):
    return {"kind": "infer", "task_id": task_id, "llm": llm, "streaming": streaming,
            "body": {**body, "stream": streaming}}


def result_of(mocked, task_id="t1"):
    return sent_json(calls_to(mocked, "POST", f"/tasks/{task_id}/result")[-1])


SESSION_CHUNKS = f"{API}/publishers/sess-1/chunks"


def expect_chunks(mocked, task_id="t1", status=200):
    """Register the session's chunks endpoint, answering every entry for
    `task_id` with `status`; returns what `wait(timeout)`s until its done
    entry (or its 410) was answered and that call recorded (see expect_result)."""
    done = threading.Event()

    def chunks(request):
        results = []
        for entry in json.loads(request.body)["tasks"]:
            if entry["task_id"] != task_id:
                results.append({"task_id": entry["task_id"], "accepted": True})
            elif status == 410:
                done.set()
                results.append({"task_id": task_id, "error": {
                    "status": 410, "code": "task_cancelled", "message": "client gone"}})
            else:
                if entry.get("done"):
                    done.set()
                results.append({"task_id": task_id, "accepted": True})
        return 200, {}, json.dumps({"results": results})
    if not any(getattr(m, "url", None) == SESSION_CHUNKS for m in mocked.registered()):
        mocked.add_callback(responses.POST, SESSION_CHUNKS, callback=chunks)

    class Done:
        @staticmethod
        def wait(timeout):
            def recorded():
                _, entries = posted_chunks(mocked, task_id)
                return status == 410 or any(entry.get("done") for entry in entries)
            if not done.wait(timeout):
                return False
            wait_for(recorded, timeout, what="the last chunk call to be recorded")
            return True
    return Done()


def posted_chunks(mocked, task_id="t1"):
    """The data of the chunks posted for `task_id`, and its entries (one per POST)."""
    entries = [entry for call in calls_to(mocked, "POST", "/publishers/sess-1/chunks")
               for entry in sent_json(call)["tasks"] if entry["task_id"] == task_id]
    return [chunk["data"] for entry in entries for chunk in entry["chunks"]], entries


def sse(*payloads) -> bytes:
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


# -- plain answers ------------------------------------------------------------

def test_a_plain_answer_is_posted_as_the_backend_gave_it(publisher, mocked):
    mocked.post(f"{BACKEND}/chat/completions", json=COMPLETION)
    posted = expect_result(mocked)

    publisher().dispatch(infer())

    assert posted.wait(5)
    assert result_of(mocked) == {"status": 200, "body": COMPLETION}
    backend_call = calls_to(mocked, "POST", "/chat/completions")[0]
    assert sent_json(backend_call) == {**BODY, "stream": False}
    assert backend_call.request.req_kwargs["timeout"][0] <= 10   # explicit (connect, read)


@pytest.mark.parametrize("status", [400, 429, 500])
def test_a_backend_error_status_is_passed_on_not_swallowed(publisher, mocked, status):
    error = {"error": {"message": "context length exceeded"}}
    mocked.post(f"{BACKEND}/chat/completions", json=error, status=status)
    posted = expect_result(mocked)

    publisher().dispatch(infer())

    assert posted.wait(5)
    assert result_of(mocked) == {"status": status, "body": error}


def test_an_unreachable_backend_posts_a_short_error_and_logs_the_details(publisher, mocked,
                                                                         caplog):
    """The posted text reaches clients (502 messages, chat history): no backend URL."""
    mocked.post(f"{BACKEND}/chat/completions",
                body=requests.ConnectionError(f"refused: {BACKEND}/chat/completions"))
    posted = expect_result(mocked)

    publisher().dispatch(infer())

    assert posted.wait(5)
    assert result_of(mocked) == {"error": "backend unreachable"}
    wait_for(lambda: BACKEND in caplog.text, what="the details in the local log")


def test_a_backend_refusing_connections_is_unreachable_not_timed_out(publisher, mocked):
    with socket.socket() as probe:   # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    mocked.add_passthru("http://127.0.0.1")
    posted = expect_result(mocked)

    publisher(url=f"http://127.0.0.1:{closed_port}/v1").dispatch(infer())

    assert posted.wait(5)
    assert result_of(mocked) == {"error": "backend unreachable"}


def test_a_backend_timeout_posts_backend_timed_out(publisher, mocked):
    mocked.post(f"{BACKEND}/chat/completions", body=requests.ReadTimeout("read timed out"))
    posted = expect_result(mocked)

    publisher().dispatch(infer())

    assert posted.wait(5)
    assert result_of(mocked) == {"error": "backend timed out"}


def test_an_api_key_goes_to_the_backend(make_config, mocked):
    mocked.post(f"{BACKEND}/chat/completions", json=COMPLETION)
    posted = expect_result(mocked)
    config = make_config(environ={"KEY": "sk-local"},
                         llms=[{"name": "vllm-local", "type": "openai", "url": BACKEND,
                                "model": "m", "api_key_env": "KEY"}])

    Publisher(config).dispatch(infer())

    assert posted.wait(5)
    assert calls_to(mocked, "POST", "/chat/completions")[0].request.headers["Authorization"] \
        == "Bearer sk-local"


def test_a_task_for_an_llm_not_published_here_gets_an_error(publisher, mocked):
    posted = expect_result(mocked)

    publisher().dispatch(infer(llm="someone-else"))

    assert posted.wait(5)
    assert result_of(mocked) == {"error": "LLM 'someone-else' is not published here"}


def test_a_result_post_is_retried_when_the_server_hiccups(publisher, mocked):
    mocked.post(f"{BACKEND}/chat/completions", json=COMPLETION)
    mocked.post(f"{API}/tasks/t1/result", status=502)
    posted = expect_result(mocked)
    p = publisher()
    p.stopping.wait = lambda seconds: False  # no real backoff sleep

    p.dispatch(infer())

    assert posted.wait(5)
    assert len(calls_to(mocked, "POST", "/tasks/t1/result")) == 2


@pytest.mark.parametrize("status", [400, 413])
def test_an_answer_the_server_refuses_is_replaced_by_an_error_once(publisher, mocked, status):
    mocked.post(f"{BACKEND}/chat/completions", json=COMPLETION)
    mocked.post(f"{API}/tasks/t1/result", status=status,
                json={"error": {"message": "body too large", "code": "too_large"}})
    posted = expect_result(mocked)

    publisher().dispatch(infer())

    assert posted.wait(5)
    results = calls_to(mocked, "POST", "/tasks/t1/result")
    assert len(results) == 2
    assert sent_json(results[1]) == {"error": f"answer refused by server ({status})"}


def test_a_task_that_cannot_start_gets_an_error_and_the_rest_of_the_batch_runs(publisher,
                                                                                 mocked):
    p = publisher(type="echo")
    batches = iter([[{"kind": "infer", "task_id": "bad", "llm": ["not", "a", "name"]},
                     infer("good")]])

    def poll(request):
        tasks = next(batches, None)
        if tasks is None:
            p.stop()
        return 200, {}, json.dumps({"tasks": tasks or []})
    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks", callback=poll)
    bad, good = expect_result(mocked, "bad"), expect_result(mocked, "good")

    p._poll_loop()

    assert bad.wait(5) and good.wait(5)
    assert result_of(mocked, "bad") == {"error": "the publisher could not start this task"}
    assert result_of(mocked, "good")["status"] == 200


# -- streamed answers ------------------------------------------------------------

def test_a_stream_is_relayed_as_chunk_batches_ending_with_done(publisher, mocked, caplog):
    caplog.set_level("INFO", logger="publisher_client")
    payloads = [json.dumps({"choices": [{"delta": {"content": w}}]}) for w in ("a ", "b ", "c")]
    mocked.post(f"{BACKEND}/chat/completions", body=sse(*payloads, "[DONE]"),
                content_type="text/event-stream")
    done = expect_chunks(mocked)

    publisher().dispatch(infer(streaming=True))

    assert done.wait(5)
    chunks, batches = posted_chunks(mocked)
    assert chunks == [*payloads, "[DONE]"]
    assert batches[0]["seq"] == 0 and batches[-1]["done"] is True
    assert sent_json(calls_to(mocked, "POST", "/chat/completions")[0])["stream"] is True
    wait_for(lambda: any("chunks in" in r.getMessage() for r in caplog.records))


def test_sse_details_are_handled(publisher, mocked):
    """CRLF line ends, comments, `event:` lines, and a missing [DONE]."""
    body = (b": keep-alive\r\n\r\nevent: message\r\ndata: {\"n\": 1}\r\n\r\n"
            b"data:{\"n\": 2}\r\n\r\n")
    mocked.post(f"{BACKEND}/chat/completions", body=body, content_type="text/event-stream")
    done = expect_chunks(mocked)

    publisher().dispatch(infer(streaming=True))

    assert done.wait(5)
    assert posted_chunks(mocked)[0] == ['{"n": 1}', '{"n": 2}', "[DONE]"]


def test_a_gzip_compressed_stream_is_decoded(publisher, mocked):
    payloads = ['{"n": 1}', '{"n": 2}']
    backend = FixedAnswerBackend(gzip.compress(sse(*payloads, "[DONE]")),
                                 {"Content-Type": "text/event-stream",
                                  "Content-Encoding": "gzip"})
    mocked.add_passthru("http://127.0.0.1")
    done = expect_chunks(mocked)
    try:
        publisher(url=backend.url).dispatch(infer(streaming=True))

        assert done.wait(5)
    finally:
        backend.stop()
    assert posted_chunks(mocked)[0] == [*payloads, "[DONE]"]


def test_a_stream_the_backend_refuses_is_posted_as_a_result(publisher, mocked):
    error = {"error": {"message": "bad request"}}
    mocked.post(f"{BACKEND}/chat/completions", json=error, status=400)
    posted = expect_result(mocked)

    publisher().dispatch(infer(streaming=True))

    assert posted.wait(5)
    assert result_of(mocked) == {"status": 400, "body": error}


def test_the_echo_backend_answers_with_the_last_user_message(publisher, mocked):
    posted = expect_result(mocked)

    publisher(type="echo").dispatch(infer(body={"model": "echo", "messages": [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": "say this back"}]}))

    assert posted.wait(5)
    body = result_of(mocked)["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "say this back"}


def test_the_echo_backend_streams_word_by_word(publisher, mocked):
    done = expect_chunks(mocked)

    publisher(type="echo").dispatch(infer(streaming=True, body={"messages": [
        {"role": "user", "content": "one two three"}]}))

    assert done.wait(5)
    chunks = posted_chunks(mocked)[0]
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "one two three"
    assert [e["choices"][0]["delta"].get("content") for e in events[1:4]] == \
        ["one ", "two ", "three"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


# -- stopping work ---------------------------------------------------------------

@pytest.fixture
def slow_backend():
    backend = SlowStreamBackend(chunks=500, interval=0.02)
    yield backend
    backend.stop()


def test_a_cancel_task_aborts_the_backend_stream_at_once(publisher, mocked, slow_backend):
    mocked.add_passthru("http://127.0.0.1")
    expect_chunks(mocked)
    p = publisher(url=slow_backend.url)
    p.dispatch(infer(streaming=True))
    wait_for(lambda: slow_backend.chunks_sent >= 5, what="the stream to start")

    p.dispatch({"kind": "cancel", "task_id": "t1"})

    assert slow_backend.disconnected.wait(2), "the backend never saw the client go"
    assert slow_backend.chunks_sent < 100
    wait_for(lambda: "t1" not in p._calls, what="the task to end")
    batches = posted_chunks(mocked)[1]
    assert not any(batch.get("done") for batch in batches)


def test_a_410_on_chunks_aborts_the_backend_stream(publisher, mocked, slow_backend):
    mocked.add_passthru("http://127.0.0.1")
    expect_chunks(mocked, status=410)
    p = publisher(url=slow_backend.url)

    p.dispatch(infer(streaming=True))

    assert slow_backend.disconnected.wait(2), "the backend never saw the client go"
    assert slow_backend.chunks_sent < 100
    assert len(posted_chunks(mocked)[1]) == 1
    assert not calls_to(mocked, "POST", "/tasks/t1/result")


def test_shutdown_aborts_running_backend_requests(publisher, mocked, slow_backend):
    mocked.add_passthru("http://127.0.0.1")
    expect_chunks(mocked)
    p = publisher(url=slow_backend.url)
    p.dispatch(infer(streaming=True))
    wait_for(lambda: slow_backend.chunks_sent >= 5, what="the stream to start")

    p.shutdown()

    assert slow_backend.disconnected.wait(2)


# -- concurrency ------------------------------------------------------------------

class GatedBackend:
    """A stub backend whose answers wait for `gate`, counting how many run at once."""

    def __init__(self):
        self.gate = threading.Event()
        self.running = 0
        self.peak = 0
        self.started = 0
        self.lock = threading.Lock()

    def available(self):
        return True

    def answer(self, body, stream, call, endpoint="chat/completions"):
        with self.lock:
            self.running += 1
            self.started += 1
            self.peak = max(self.peak, self.running)
        self.gate.wait(5)
        with self.lock:
            self.running -= 1
        return Answer(200, {"ok": True})


def test_at_most_max_concurrency_tasks_run_per_llm(publisher, mocked):
    for i in range(5):
        expect_result(mocked, f"t{i}")
    p = publisher(max_concurrency=2)
    backend = p.llms["vllm-local"].backend = GatedBackend()

    for i in range(5):
        p.dispatch(infer(task_id=f"t{i}"))
    wait_for(lambda: backend.started == 2, what="two tasks to start")
    assert backend.running == 2
    backend.gate.set()

    wait_for(lambda: all(calls_to(mocked, "POST", f"/tasks/t{i}/result") for i in range(5)),
             what="all five results")
    assert backend.peak == 2


def test_waiting_tasks_hold_no_thread_of_their_own(publisher, mocked):
    for i in range(20):
        expect_result(mocked, f"t{i}")
    p = publisher(max_concurrency=2)
    backend = p.llms["vllm-local"].backend = GatedBackend()
    before = set(threading.enumerate())   # earlier tests' idle pool threads among them

    for i in range(20):
        p.dispatch(infer(task_id=f"t{i}"))
    wait_for(lambda: backend.started == 2, what="two tasks to start")
    pool_threads = [t for t in set(threading.enumerate()) - before
                    if t.name.startswith("llm-vllm-local-")]
    assert len(pool_threads) == 2   # 18 tasks wait in line, not in threads
    backend.gate.set()

    wait_for(lambda: all(calls_to(mocked, "POST", f"/tasks/t{i}/result") for i in range(20)),
             what="all twenty results")
    assert backend.peak == 2


def test_a_full_line_refuses_a_task_with_an_error():
    from publisher_client.publisher import TaskPool

    gate, ran = threading.Event(), []
    pool = TaskPool("m", size=1, backlog=2)
    assert pool.submit(gate.wait, 5)                     # runs
    wait_for(lambda: pool._waiting == 0, what="the first task to start")
    assert pool.submit(ran.append, 1) and pool.submit(ran.append, 2)   # wait in line
    assert not pool.submit(ran.append, 3)                # the line is full
    gate.set()
    wait_for(lambda: ran == [1, 2], what="the waiting tasks to run in order")


def test_a_task_cancelled_while_waiting_for_a_slot_never_reaches_the_backend(publisher,
                                                                             mocked):
    expect_result(mocked, "first")
    p = publisher(max_concurrency=1)
    backend = p.llms["vllm-local"].backend = GatedBackend()
    p.dispatch(infer(task_id="first"))
    wait_for(lambda: backend.started == 1)

    p.dispatch(infer(task_id="queued"))
    p.dispatch({"kind": "cancel", "task_id": "queued"})
    backend.gate.set()

    wait_for(lambda: "queued" not in p._calls, what="the queued task to end")
    assert backend.started == 1
    assert not calls_to(mocked, "POST", "/tasks/queued/result")


def test_a_call_aborted_before_its_connection_exists_shuts_the_socket_at_once():
    call = Call()
    call.abort()
    ours, backends = socket.socketpair()

    call.hold(ours)

    backends.settimeout(1)
    assert backends.recv(1) == b""   # EOF: the backend sees us go
    ours.close()
    backends.close()


# -- stopping work before the backend sends headers -------------------------------

@pytest.fixture
def late_backend():
    backend = LateHeadersBackend(delay=5.0)
    yield backend
    backend.stop()


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "stream"])
def test_a_cancel_stops_a_request_whose_backend_has_not_sent_headers_yet(
        publisher, mocked, late_backend, streaming):
    mocked.add_passthru("http://127.0.0.1")
    p = publisher(url=late_backend.url)
    p.dispatch(infer(streaming=streaming))
    assert late_backend.received.wait(2)  # the backend holds the request, sending nothing
    cancelled = time.monotonic()

    p.dispatch({"kind": "cancel", "task_id": "t1"})

    wait_for(lambda: "t1" not in p._calls, timeout=1.0, what="the call to return")
    assert time.monotonic() - cancelled < 1.0
    assert late_backend.disconnected.wait(1), "the backend never saw the client go"
    assert not calls_to(mocked, "POST", "/tasks/t1/result")


def test_a_backend_that_answers_too_late_timed_out(publisher, mocked, late_backend,
                                                   monkeypatch):
    monkeypatch.setattr(backends, "INFER_READ_TIMEOUT", 0.3)
    mocked.add_passthru("http://127.0.0.1")
    posted = expect_result(mocked)

    publisher(url=late_backend.url).dispatch(infer())

    assert posted.wait(5)
    assert result_of(mocked) == {"error": "backend timed out"}


def test_an_aborted_call_returns_at_once_while_the_backend_holds_its_headers(late_backend):
    backend = OpenAIBackend(LlmConfig(name="v", type="openai", model="m", url=late_backend.url))
    call = Call()
    threading.Timer(0.5, call.abort).start()
    started = time.monotonic()

    with pytest.raises(Aborted):
        backend.answer({"messages": []}, False, call)

    assert time.monotonic() - started < 1.0
    assert late_backend.disconnected.wait(1)


def test_a_late_abort_does_not_touch_the_next_request_on_a_kept_alive_connection():
    import socket

    from publisher_client.backends import Call

    first, second = Call(), Call()
    ours, theirs = socket.socketpair()
    first.hold(ours)
    first.release()  # its request ended; the pool may now lend `ours` to `second`
    second.hold(ours)
    first.abort()  # e.g. a cancel that arrived while its result was being posted
    theirs.sendall(b"x")
    assert ours.recv(1) == b"x"  # still open for the second request
    ours.close()
    theirs.close()
