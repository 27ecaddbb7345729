"""Public LLMs end to end: the real server (gunicorn + gevent) on a free
loopback port, driven over HTTP and with the official `openai` SDK, in front
of a FakeOpenAI upstream run by the test."""
import json
import time

import openai
import pytest
import requests

from tests.support.fake_openai import completion_chunk
from tests.support.live import free_port
from tests.support.waiting import wait_until

SECRET = "sk-e2e-upstream-secret"
CHAT = {"messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def server(module_live_server):
    return module_live_server


@pytest.fixture(scope="module")
def fake(module_fake_openai):
    return module_fake_openai


@pytest.fixture(scope="module")
def http(server):
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture(scope="module")
def llm(server, fake, http):
    """One public LLM in front of the fake, for the whole module."""
    response = http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"), json={
        "name": "fake-gpt", "model": "upstream-model", "url": fake.url, "api_key": SECRET})
    assert response.status_code == 201, response.text
    return "fake-gpt"


@pytest.fixture(autouse=True)
def fresh_fake(fake):
    fake.reset()


@pytest.fixture
def sdk(server, llm):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.tokens["client"],
                           max_retries=0, timeout=10)
    yield client
    client.close()


def infer(server, http, name, body, **kwargs):
    return http.post(f"{server.url}/api/v1/llms/{name}/infer", json=body,
                     headers=server.headers("client"), timeout=10, **kwargs)


def read_events(response):
    """[(seconds since the request, payload)] of each SSE `data:` event."""
    started = time.monotonic()
    return [(time.monotonic() - started, line[len(b"data: "):].decode())
            for line in response.iter_lines() if line.startswith(b"data: ")]


# -- plain HTTP --------------------------------------------------------------------

def test_a_non_streamed_call_is_proxied_with_the_rows_model_and_key(server, fake, http, llm):
    response = infer(server, http, llm, {**CHAT, "model": "client-model", "seed": 1})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello there"
    sent = fake.chat_requests[-1]
    assert sent["json"] == {**CHAT, "model": "upstream-model", "seed": 1}
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_a_stream_arrives_event_by_event_and_ends_with_one_done(server, fake, http, llm):
    words = ["The", " quick", " brown", " fox"]
    fake.script(chunks=words, chunk_delay=0.25)
    with infer(server, http, llm, {**CHAT, "stream": True}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        events = read_events(response)
    payloads = [payload for _, payload in events]
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    assert [json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1]] == words
    # Each event left as the upstream sent it, not all at the end.
    assert events[-1][0] - events[0][0] > 0.5


def test_an_upstream_4xx_comes_back_with_its_status_and_body(server, fake, http, llm):
    body = {"error": {"message": "This model's maximum context length is 8 tokens",
                      "type": "invalid_request_error", "code": "context_length_exceeded"}}
    fake.script(status=400, body=body)
    response = infer(server, http, llm, CHAT)
    assert response.status_code == 400
    assert response.json() == body


def test_an_unreachable_upstream_is_a_502_envelope(server, http):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    created = http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"),
                        json={"name": "dead-gpt", "model": "m", "url": dead})
    assert created.status_code == 201
    response = infer(server, http, "dead-gpt", CHAT)
    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_unreachable")
    assert "dead-gpt" in error["message"]


def test_a_stream_the_upstream_breaks_ends_with_an_error_event(server, fake, http, llm):
    fake.script(chunks=["one", "two", "three"], break_after=2)
    with infer(server, http, llm, {**CHAT, "stream": True}, stream=True) as response:
        payloads = [payload for _, payload in read_events(response)]
    assert len(payloads) == 3
    assert json.loads(payloads[-1])["error"]["code"] == "upstream_stream_broken"


def test_a_body_over_the_limit_is_a_413_envelope(server, http, llm):
    body = {**CHAT, "padding": "x" * (4 * 1024 * 1024)}
    response = infer(server, http, llm, body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_a_chunked_body_over_the_limit_is_a_413_envelope(server, http, llm):
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(5 * 16):
            yield b"x" * 65536
        yield b'"}]}'

    response = http.post(f"{server.url}/api/v1/llms/{llm}/infer", data=body(), timeout=10,
                         headers={**server.headers("client"), "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_a_token_revoked_with_the_cli_is_refused_by_the_running_server(server, http):
    token = server.flask("tokens", "create", "short-lived", "--role", "client").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert http.get(f"{server.url}/api/v1/llms", headers=headers).status_code == 200
    server.flask("tokens", "revoke", "short-lived")

    def refusal():  # by every worker, once its memory of the token lapses (AUTH_CACHE_TTL, 1 s)
        response = http.get(f"{server.url}/api/v1/llms", headers=headers)
        return response.json()["error"]["code"] if response.status_code == 401 else None

    assert wait_until(refusal, timeout=5, message="the token is refused") == "revoked_token"


def test_the_server_log_never_carries_the_key(server, fake, http, llm):
    fake.script(chunks=["one", "two"], break_after=1)  # logs a warning
    with infer(server, http, llm, {**CHAT, "stream": True}, stream=True) as response:
        response.content
    deadline = time.monotonic() + 5
    while "broke" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "fake-gpt" in server.log_text()
    assert SECRET not in server.log_text()


# -- the official openai SDK -----------------------------------------------------------

def test_sdk_lists_models_by_llm_name(sdk, llm):
    assert llm in [model.id for model in sdk.models.list()]


def test_sdk_retrieves_a_model_by_llm_name(sdk, llm):
    model = sdk.models.retrieve(llm)
    assert (model.id, model.object, model.owned_by) == (llm, "model", "public")


def test_sdk_retrieving_an_unknown_model_raises_not_found_pointing_at_the_list(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("no-such-llm")
    assert "GET /v1/models lists the models you can use" in str(caught.value)


def test_sdk_calling_an_endpoint_we_do_not_serve_names_the_ones_we_do(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.moderations.create(model="fake-gpt", input="hi")
    assert caught.value.body["code"] == "unsupported_endpoint"
    assert "POST /v1/chat/completions" in caught.value.body["message"]


def test_sdk_creates_a_chat_completion(sdk, fake, llm):
    completion = sdk.chat.completions.create(
        model=llm, messages=[{"role": "user", "content": "ping pong"}], temperature=0.1)
    assert completion.choices[0].message.content == "ping pong"
    assert fake.chat_requests[-1]["json"]["model"] == "upstream-model"
    assert fake.chat_requests[-1]["json"]["temperature"] == 0.1


def test_sdk_streams_a_chat_completion(sdk, fake, llm):
    fake.script(chunks=["Hel", "lo", completion_chunk(None, finish_reason="stop")])
    stream = sdk.chat.completions.create(
        model=llm, messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert fake.chat_requests[-1]["json"]["stream"] is True


def test_sdk_raises_not_found_with_our_message_for_an_unknown_model(sdk):
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="no-such-llm",
                                    messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert "LLM 'no-such-llm' not found" in str(caught.value)
    assert caught.value.body["code"] == "llm_not_found"


def test_sdk_raises_authentication_error_with_a_bad_token(server, llm):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sb_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Unknown token"):
        client.models.list()
    client.close()


def test_sdk_raises_on_a_stream_the_upstream_breaks(sdk, fake, llm):
    fake.script(chunks=["one", "two"], break_after=1)
    stream = sdk.chat.completions.create(
        model=llm, messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="broke"):
        list(stream)


# -- a late first byte ---------------------------------------------------------------

def test_a_stream_whose_upstream_is_slow_to_start_gets_keepalives_then_the_answer(
        live_server_factory, fake, http):
    quick = live_server_factory({"SWITCHBOARD_STREAM_KEEPALIVE": "0.2"})
    created = http.post(f"{quick.url}/api/v1/llms", headers=quick.headers("admin"), json={
        "name": "slow-start", "model": "m", "url": fake.url})
    assert created.status_code == 201
    fake.script(chunks=["loaded", " at last"], delay=1.0)  # a model still loading
    started = time.monotonic()
    with infer(quick, http, "slow-start", {**CHAT, "stream": True}, stream=True) as response:
        assert response.status_code == 200
        lines = [(time.monotonic() - started, line) for line in response.iter_lines() if line]
    comments = [at for at, line in lines if line == b": keepalive"]
    assert len(comments) >= 3
    assert comments[0] < 0.8  # the headers and a first comment well before the first byte
    payloads = [line[len(b"data: "):] for _, line in lines if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    assert [json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1]] == [
        "loaded", " at last"]

    fake.script(chunks=["through", " the SDK"], delay=0.7)
    sdk = openai.OpenAI(base_url=quick.url + "/v1", api_key=quick.tokens["client"],
                        max_retries=0, timeout=10)
    stream = sdk.chat.completions.create(model="slow-start", stream=True,
                                         messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "through the SDK"
    sdk.close()
