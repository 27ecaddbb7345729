"""services/upstream.py: the proxy to a public LLM's OpenAI-compatible upstream.

`responses` fakes the network where a test is about what is sent and what
comes back; the real-socket FakeOpenAI where it is about timing and framing.
"""
import dataclasses
import json
import time

import pytest
import requests
import responses
from cryptography.fernet import Fernet
from responses import matchers

from services.api_keys import ApiKeyCipher
from services.bus.memory import MemoryTaskBus
from services.errors import BadGateway
from services.inference import Target
from services.relay import Relay
from services.upstream import Upstream, _HTTPConnection
from settings import DEFAULTS
from tests.support.live import free_port

URL = "http://upstream.test/v1"
COMPLETIONS = f"{URL}/chat/completions"
CHAT = {"model": "client-said", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"object": "chat.completion", "choices": [{"message": {"content": "yo"}}]}


SECRET_KEY = Fernet.generate_key().decode()
CIPHER = ApiKeyCipher(SECRET_KEY)


def target(url=URL, api_key="sk-stored", model="row-model"):
    """A public LLM's Target, its key as the database holds it (encrypted)."""
    fields = {f.name: None for f in dataclasses.fields(Target)}  # publisher-side ones stay None
    return Target(**{**fields, "name": "gpt-x", "kind": "public", "status": "active",
                     "model": model, "url": url, "api_key": CIPHER.encrypt(api_key)})


@pytest.fixture
def upstream():
    return Upstream(connect_timeout=1.0, read_timeout=5.0, stream_idle_timeout=5.0,
                    cipher=CIPHER)


@pytest.fixture
def mocked():
    with responses.RequestsMock() as mock:  # fails the test if a registered call never happened
        yield mock


def sse(*payloads):
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


# -- what is sent --------------------------------------------------------------

def test_the_stored_key_is_sent_as_a_bearer_token(upstream, mocked):
    mocked.post(COMPLETIONS, json=COMPLETION, match=[
        matchers.header_matcher({"Authorization": "Bearer sk-stored"})])
    upstream.forward(target(), CHAT)


def test_no_authorization_header_without_a_stored_key(upstream, mocked):
    call = mocked.post(COMPLETIONS, json=COMPLETION)
    upstream.forward(target(api_key=None), CHAT)
    assert "Authorization" not in call.calls[0].request.headers


def test_the_body_goes_to_the_urls_chat_completions_as_json(upstream, mocked):
    mocked.post(COMPLETIONS, json=COMPLETION, match=[matchers.json_params_matcher(CHAT)])
    upstream.forward(target(url=URL + "/"), CHAT)


def test_the_relay_replaces_the_clients_model_with_the_rows(mocked):
    relay = Relay.from_config({**DEFAULTS, "API_KEY_SECRET": SECRET_KEY}, bus=MemoryTaskBus())
    body = {**CHAT, "seed": 7, "response_format": {"type": "json_object"}}
    mocked.post(COMPLETIONS, json=COMPLETION, match=[
        matchers.json_params_matcher({**body, "model": "row-model"})])
    relay.infer(target(), body)


# -- what comes back -----------------------------------------------------------

def test_a_success_comes_back_with_its_status_and_body(upstream, mocked):
    mocked.post(COMPLETIONS, json=COMPLETION, status=200)
    reply = upstream.forward(target(), CHAT)
    assert reply.status == 200
    assert json.loads(reply.body) == COMPLETION
    assert reply.content_type == "application/json"


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429, 500, 503])
def test_an_upstream_error_comes_back_with_its_status_and_body(upstream, mocked, status):
    body = {"error": {"message": f"upstream says {status}", "type": "x"}}
    mocked.post(COMPLETIONS, json=body, status=status)
    reply = upstream.forward(target(), CHAT)
    assert reply.status == status
    assert json.loads(reply.body) == body


def test_a_non_json_body_keeps_its_content_type(upstream, mocked):
    mocked.post(COMPLETIONS, body="<html>bad gateway</html>", status=502,
                content_type="text/html")
    reply = upstream.forward(target(), CHAT)
    assert (reply.status, reply.body, reply.content_type) == (
        502, b"<html>bad gateway</html>", "text/html")


def test_an_unreachable_upstream_is_bad_gateway(upstream):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BadGateway) as caught:
        upstream.forward(target(url=dead), CHAT)
    assert caught.value.code == "upstream_unreachable"
    assert "gpt-x" in caught.value.message and "unreachable" in caught.value.message


def test_an_upstream_timeout_is_bad_gateway_saying_so(upstream, mocked):
    mocked.post(COMPLETIONS, body=requests.ReadTimeout("slow"))
    with pytest.raises(BadGateway, match="timed out"):
        upstream.forward(target(), CHAT)


def test_a_bad_gateway_message_never_carries_the_key(upstream, mocked):
    mocked.post(COMPLETIONS, body=requests.ConnectionError("sk-stored refused"))
    with pytest.raises(BadGateway) as caught:
        upstream.forward(target(), CHAT)
    assert "sk-stored" not in caught.value.message


def test_connections_to_an_upstream_are_reused(upstream, fake_openai):
    for _ in range(3):
        upstream.forward(target(url=fake_openai.url), CHAT)
    assert len({r["client_port"] for r in fake_openai.requests}) == 1


def test_an_upstreams_cookie_is_not_sent_with_later_calls(upstream, fake_openai):
    fake_openai.script(body={"choices": []}, headers={"Set-Cookie": "session=client-a"})
    upstream.forward(target(url=fake_openai.url), CHAT)
    upstream.forward(target(url=fake_openai.url), CHAT)
    assert "Cookie" not in fake_openai.requests[-1]["headers"]


# -- streams ---------------------------------------------------------------------

def test_a_stream_comes_back_as_server_sent_events(upstream, mocked):
    body = sse('{"choices": [{"delta": {"content": "a"}}]}', "[DONE]")
    mocked.post(COMPLETIONS, body=body, content_type="text/event-stream")
    reply = upstream.forward(target(), {**CHAT, "stream": True})
    assert (reply.status, reply.content_type) == (200, "text/event-stream")
    assert b"".join(reply.stream) == body


def test_a_stream_request_answered_with_an_error_returns_the_error(upstream, mocked):
    mocked.post(COMPLETIONS, json={"error": {"message": "no such model"}}, status=404)
    reply = upstream.forward(target(), {**CHAT, "stream": True})
    assert reply.stream is None
    assert (reply.status, json.loads(reply.body)) == (404, {"error": {"message": "no such model"}})


def test_a_stream_request_answered_with_one_json_body_returns_it_as_json(upstream, mocked):
    mocked.post(COMPLETIONS, json=COMPLETION)
    reply = upstream.forward(target(), {**CHAT, "stream": True})
    assert reply.stream is None
    assert reply.content_type == "application/json"
    assert json.loads(reply.body) == COMPLETION


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_a_stream_is_relayed_chunk_by_chunk_as_it_arrives(upstream, fake_openai, chunked):
    fake_openai.script(chunks=["one", "two", "three"], chunk_delay=1.0, chunked=chunked)
    started = time.monotonic()
    reply = upstream.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    try:
        first = next(reply.stream)
        elapsed = time.monotonic() - started
    finally:
        reply.stream.close()
    assert b'"one"' in first and b'"two"' not in first
    assert elapsed < 0.9  # the next chunk is a second away


def test_a_stream_broken_before_its_first_byte_is_bad_gateway(upstream, fake_openai):
    fake_openai.script(chunks=["one"], break_after=0)
    with pytest.raises(BadGateway):
        upstream.forward(target(url=fake_openai.url), {**CHAT, "stream": True})


# -- keep-alives while the first byte is late -------------------------------------

KEEPALIVE = 0.1


@pytest.fixture
def keeping_alive():
    return Upstream(connect_timeout=1.0, read_timeout=5.0, stream_idle_timeout=5.0,
                    cipher=CIPHER, keepalive=KEEPALIVE)


def timed_events(stream):
    """[(seconds since the call, event bytes)] of an SSE byte stream."""
    started, events = time.monotonic(), []
    for data in stream:
        events += [(time.monotonic() - started, e) for e in data.split(b"\n\n") if e]
    return events


def test_a_late_first_byte_gets_keepalive_comments_then_the_stream(keeping_alive, fake_openai):
    fake_openai.script(chunks=["one", "two"], delay=0.5)
    reply = keeping_alive.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    assert (reply.status, reply.content_type) == (200, "text/event-stream")
    events = timed_events(reply.stream)
    comments = [at for at, e in events if e == b": keepalive"]
    data = [e for _, e in events if e.startswith(b"data: ")]
    assert len(comments) >= 3  # one at once (the headers go), then every KEEPALIVE s
    assert comments[0] < 0.25
    assert events[0][1] == b": keepalive" and events[-1][1] == b"data: [DONE]"
    assert b'"one"' in data[0] and b'"two"' in data[1]


def test_a_prompt_first_byte_gets_no_keepalive(keeping_alive, fake_openai):
    fake_openai.script(chunks=["one"])
    reply = keeping_alive.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    assert b": keepalive" not in b"".join(reply.stream)


def test_a_prompt_error_keeps_its_status_with_keepalives_on(keeping_alive, fake_openai):
    fake_openai.script(status=401, body={"error": {"message": "bad key"}})
    reply = keeping_alive.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    assert reply.stream is None and reply.status == 401


def test_a_late_error_is_the_streams_last_event(keeping_alive, fake_openai):
    fake_openai.script(status=429, body={"error": {"message": "slow down"}}, delay=0.3)
    reply = keeping_alive.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    *comments, (_, last) = timed_events(reply.stream)
    assert comments and all(e == b": keepalive" for _, e in comments)
    assert json.loads(last.removeprefix(b"data: "))["error"] == {
        "message": "The upstream of LLM 'gpt-x' answered 429: slow down",
        "type": "upstream_error", "code": "upstream_error_status", "details": {"status": 429}}


def test_a_late_failure_to_connect_is_the_streams_last_event(keeping_alive, fake_openai):
    fake_openai.script(chunks=["one"], break_after=0, delay=0.3)
    reply = keeping_alive.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    *_, (_, last) = timed_events(reply.stream)
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_unreachable"


def test_a_kept_alive_stream_closed_unread_closes_the_late_answer(keeping_alive, fake_openai):
    fake_openai.script(chunks=["one", "two"], delay=0.3, chunk_delay=5.0)
    reply = keeping_alive.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    reply.stream.close()  # the client left before a byte was written
    opening = reply.stream._opening
    assert opening.done.wait(5)
    response = opening.outcome().response
    deadline = time.monotonic() + 5
    while not response.raw.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert response.raw.closed


def test_a_stream_broken_midway_ends_with_an_error_event(upstream, fake_openai):
    fake_openai.script(chunks=["one", "two", "three"], break_after=2)
    reply = upstream.forward(target(url=fake_openai.url), {**CHAT, "stream": True})
    events = [e for e in b"".join(reply.stream).split(b"\n\n") if e]
    assert len(events) == 3
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_stream_broken"
    assert "gpt-x" in last["error"]["message"]
    assert b"[DONE]" not in b"".join(events)



# -- the connection ------------------------------------------------------------------

class RecordingSocket:
    def __init__(self):
        self.writes = []

    def settimeout(self, timeout):
        pass

    def sendall(self, data):
        self.writes.append(bytes(data))


def test_a_request_goes_out_in_one_write():
    connection = _HTTPConnection("upstream.test", 80)
    connection.sock = RecordingSocket()
    connection.request("POST", "/v1/chat/completions", body=b'{"model": "m"}',
                       headers={"Content-Type": "application/json"})
    assert len(connection.sock.writes) == 1
    assert connection.sock.writes[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert connection.sock.writes[0].endswith(b'\r\n\r\n{"model": "m"}')


def test_a_request_without_a_body_still_sends_its_head():
    connection = _HTTPConnection("upstream.test", 80)
    connection.sock = RecordingSocket()
    connection.request("GET", "/v1/models")
    assert len(connection.sock.writes) == 1
    assert connection.sock.writes[0].endswith(b"\r\n\r\n")


def test_an_idle_connection_is_connected_until_its_peer_closes():
    import socket

    ours, theirs = socket.socketpair()
    connection = _HTTPConnection("upstream.test", 80)
    connection.sock = ours
    assert connection.is_connected
    theirs.close()
    assert not connection.is_connected
    ours.close()


def test_a_connection_with_stray_bytes_waiting_is_not_reused():
    import socket

    ours, theirs = socket.socketpair()
    connection = _HTTPConnection("upstream.test", 80)
    connection.sock = ours
    theirs.sendall(b"HTTP/1.1 200 OK\r\n")  # a late answer: the stream is out of step
    assert not connection.is_connected
    ours.close()
    theirs.close()


def test_an_unconnected_connection_is_not_connected():
    assert not _HTTPConnection("upstream.test", 80).is_connected


def test_the_adapter_pools_one_write_connections(upstream, fake_openai):
    upstream.forward(target(url=fake_openai.url), CHAT)
    pool = upstream.adapter.poolmanager.connection_from_url(fake_openai.url)
    assert pool.ConnectionCls is _HTTPConnection
