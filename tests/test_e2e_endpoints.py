"""Completions, embeddings, responses and Anthropic's messages end to end: the
real server (gunicorn + gevent) with the official `openai` and `anthropic`
SDKs, in front of a FakeOpenAI upstream that records what it received (public
LLMs), of a publisher speaking the protocol over HTTP, and of the real
`publisher_client` with its echo backend or with the FakeOpenAI as its
backend (virtual LLMs)."""
import json

import anthropic
import openai
import pytest
import requests

from publisher_client.backends import embedding_of as echo_embedding_of
from tests.publisher_client.helpers import PublisherProcess
from tests.support.fake_openai import embedding_of
from tests.support.protocol_publisher import ProtocolPublisher
from tests.support.waiting import wait_until

SECRET = "sk-endpoints-upstream-secret"
EVERY = ["chat/completions", "completions", "embeddings", "responses", "messages"]


@pytest.fixture(scope="module")
def server(module_live_server):
    return module_live_server


@pytest.fixture(scope="module")
def fake(module_fake_openai):
    return module_fake_openai


@pytest.fixture(autouse=True)
def fresh_fake(fake):
    fake.reset()


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


def create_llm(server, http, name, url, **fields):
    response = http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"),
                         json={"name": name, "model": f"{name}-upstream", "url": url, **fields})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def every(server, fake, http):
    """A public LLM serving every endpoint, with an upstream key."""
    create_llm(server, http, "all-in-one", fake.url, api_key=SECRET, endpoints=EVERY)
    return "all-in-one"


@pytest.fixture(scope="module")
def chat_only(server, fake, http):
    create_llm(server, http, "chat-only", fake.url)
    return "chat-only"


@pytest.fixture
def sdk(server, every):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.tokens["client"],
                           max_retries=0, timeout=10)
    yield client
    client.close()


@pytest.fixture
def claude(server, every):
    client = anthropic.Anthropic(base_url=server.url, api_key=server.tokens["client"],
                                 max_retries=0, timeout=10)
    yield client
    client.close()


def post(server, http, path, body, headers=None, **kwargs):
    return http.post(f"{server.url}/v1/{path}", json=body, timeout=10,
                     headers=headers or server.headers("client"), **kwargs)


def sse_lines(response) -> list[str]:
    return [line.decode() for line in response.iter_lines() if line]


# -- OpenAI's endpoints, public LLM ------------------------------------------------

def test_completions_reach_the_upstreams_completions_with_the_rows_model_and_key(
        sdk, fake, every):
    answer = sdk.completions.create(model=every, prompt="once upon a time", max_tokens=5)
    assert answer.choices[0].text == "once upon a time"
    sent = fake.requests_to("completions")[-1]
    assert sent["json"] == {"model": "all-in-one-upstream", "prompt": "once upon a time",
                            "max_tokens": 5}
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_a_streamed_completion_arrives_piece_by_piece_and_ends_with_one_done(
        server, http, every):
    with post(server, http, "completions", {"model": every, "prompt": "a b c",
                                            "stream": True}, stream=True) as response:
        assert response.status_code == 200
        lines = sse_lines(response)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert "".join(texts) == "a b c"


def test_embeddings_come_back_as_the_backend_computed_them(sdk, fake, every):
    answer = sdk.embeddings.create(model=every, input=["a", "b"])
    assert [item.embedding for item in answer.data] == [embedding_of("a"), embedding_of("b")]
    assert fake.requests_to("embeddings")[-1]["json"]["input"] == ["a", "b"]


def test_responses_come_back_whole_and_streamed_event_by_event(sdk, server, http, every):
    assert sdk.responses.create(model=every, input="hello responses").output_text == \
        "hello responses"
    with sdk.responses.create(model=every, input="x y", stream=True) as events:
        kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.output_text.delta",
                     "response.output_text.delta", "response.completed"]
    with post(server, http, "responses", {"model": every, "input": "x", "stream": True},
              stream=True) as response:
        lines = sse_lines(response)
    assert lines[0] == "event: response.created"
    assert not any("[DONE]" in line for line in lines)  # OpenAI's responses streams have none


def test_a_backend_error_comes_back_with_its_own_status_and_body(server, http, fake, every):
    body = {"error": {"message": "input too long", "type": "invalid_request_error"}}
    fake.script(status=400, body=body)
    response = post(server, http, "embeddings", {"model": every, "input": "x"})
    assert (response.status_code, response.json()) == (400, body)


@pytest.mark.parametrize("path, body, message", [
    ("completions", {"model": "m"}, "prompt: Missing data for required field."),
    ("completions", {"model": "m", "prompt": []}, "prompt: Must be a string"),
    ("embeddings", {"model": "m", "input": 3}, "input: Must be a string"),
    ("embeddings", {"input": "x"}, "model: Missing data for required field."),
    ("responses", {"model": "m", "input": "x", "stream": "yes"}, "stream: Not a valid boolean."),
])
def test_a_bad_body_is_a_400_naming_the_field(server, http, every, path, body, message):
    response = post(server, http, path, body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(message)


def test_an_endpoint_the_llm_does_not_serve_is_a_400_naming_what_it_does(
        sdk, fake, chat_only):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.embeddings.create(model=chat_only, input="x")
    error = raised.value.body
    assert error["code"] == "endpoint_not_supported"
    assert "/v1/embeddings" in error["message"] and "/v1/chat/completions" in error["message"]
    assert fake.requests == []


def test_a_pool_runs_an_endpoint_on_the_members_that_serve_it(server, http, fake):
    for name, endpoints in (("pool-chat", ["chat/completions"]),
                            ("pool-embed", ["chat/completions", "embeddings"])):
        created = http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"), json={
            "name": name, "model": "shared-embedder", "url": fake.url, "endpoints": endpoints})
        assert created.status_code == 201
    for _ in range(3):
        response = post(server, http, "embeddings", {"model": "pool:shared-embedder",
                                                     "input": "x"})
        assert response.status_code == 200, response.text
    assert len(fake.requests_to("embeddings")) == 3
    response = post(server, http, "messages", {"model": "pool:shared-embedder", "max_tokens": 5,
                                               "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400
    assert "/v1/messages" in response.json()["error"]["message"]


# -- Anthropic's messages, public LLM ------------------------------------------------

def test_the_anthropic_sdk_sends_messages_with_its_x_api_key(claude, fake, every):
    message = claude.messages.create(model=every, max_tokens=20,
                                     messages=[{"role": "user", "content": "hello claude"}])
    assert message.content[0].text == "hello claude"
    sent = fake.requests_to("messages")[-1]
    assert sent["json"]["model"] == "all-in-one-upstream"
    assert sent["headers"]["x-api-key"] == SECRET  # the stored key, the way Anthropic takes it
    assert "Authorization" not in sent["headers"]
    assert sent["headers"]["anthropic-version"]  # the client's, passed on


def test_the_anthropic_sdk_streams_messages_event_by_event(claude, every):
    with claude.messages.stream(model=every, max_tokens=20,
                                messages=[{"role": "user", "content": "one two three"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["one", " two", " three"]
    assert final.stop_reason == "end_turn"


def test_errors_on_messages_use_anthropics_envelope(server, http, claude, every):
    ask = {"model": every, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    unauthenticated = post(server, http, "messages", ask, headers={"x-api-key": "sb-wrong"})
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["type"] == "error"
    assert unauthenticated.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="no-such-model", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
    assert raised.value.body["error"]["type"] == "not_found_error"
    assert "/v1/models" in raised.value.body["error"]["message"]
    invalid = post(server, http, "messages", {"model": every, "messages": []})
    assert invalid.status_code == 400
    assert invalid.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages: Shorter than minimum length 1."}}


def test_a_messages_stream_that_breaks_ends_with_anthropics_error_event(server, http, fake,
                                                                      every):
    start = ("message_start", {"type": "message_start", "message": {"id": "m", "content": []}})
    fake.script(chunks=[start, start, start], break_after=1, done=False)
    with post(server, http, "messages", {"model": every, "max_tokens": 5, "stream": True,
                                         "messages": [{"role": "user", "content": "x"}]},
              stream=True) as response:
        lines = sse_lines(response)
    assert lines[:2] == ["event: message_start", f"data: {json.dumps(start[1])}"]
    assert lines[2] == "event: error"
    error = json.loads(lines[3][len("data: "):])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "broke" in error["error"]["message"]


def test_the_token_counts_as_x_api_key_only_on_anthropics_route(server, http, every):
    response = post(server, http, "completions", {"model": every, "prompt": "x"},
                    headers={"x-api-key": server.tokens["client"]})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_token"


# -- virtual LLMs --------------------------------------------------------------------

def test_a_virtual_llm_gets_the_endpoint_in_its_task_and_answers_it(server, sdk):
    def handler(publisher, task):
        vectors = [embedding_of(text) for text in task["body"]["input"]]
        publisher.result(task["task_id"], status=200, body={
            "object": "list", "model": task["body"]["model"], "endpoint": task["endpoint"],
            "data": [{"object": "embedding", "index": n, "embedding": v}
                     for n, v in enumerate(vectors)]})

    publisher = ProtocolPublisher(server, [{"name": "local-embedder", "model": "nomic",
                                            "endpoints": ["embeddings"]}], handler).start()
    try:
        answer = sdk.embeddings.create(model="local-embedder", input=["a", "b"])
        assert [item.embedding for item in answer.data] == [embedding_of("a"),
                                                            embedding_of("b")]
        assert answer.model_extra["endpoint"] == "embeddings"
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.chat.completions.create(model="local-embedder",
                                        messages=[{"role": "user", "content": "x"}])
        assert raised.value.body["code"] == "endpoint_not_supported"
    finally:
        publisher.stop()


def test_usage_counts_the_other_endpoints_in_their_own_names(server, http, claude, sdk, fake):
    create_llm(server, http, "usage-counted", fake.url, endpoints=["embeddings", "messages"])
    fake.script(body={"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 8},
                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]})
    sdk.embeddings.create(model="usage-counted", input="x")
    claude.messages.create(model="usage-counted", max_tokens=9,  # the fake: 1 in, 3 out
                           messages=[{"role": "user", "content": "three more words"}])

    def row():
        response = http.get(f"{server.url}/api/v1/usage", headers=server.headers("client"),
                            timeout=10)
        rows = [r for r in response.json() if r["llm"] == "usage-counted"]
        return rows[0] if rows and rows[0]["requests"] == 2 else None

    assert wait_until(row, timeout=10, message="usage written") == {
        "token": "client", "llm": "usage-counted", "requests": 2, "errors": 0,
        "prompt_tokens": 9, "completion_tokens": 3, "estimated": False}



def test_a_stream_posted_task_by_task_keeps_its_event_names(server, http):
    events = [{"event": "response.created", "data": '{"type": "response.created"}'},
              {"event": "response.completed", "data": '{"type": "response.completed"}'}]

    def handler(publisher, task):
        publisher.chunks(task["task_id"], events, seq=0, done=True)

    publisher = ProtocolPublisher(server, [{"name": "task-chunks", "model": "m",
                                            "endpoints": ["responses"]}], handler).start()
    try:
        with post(server, http, "responses", {"model": "task-chunks", "input": "x",
                                              "stream": True}, stream=True) as response:
            assert response.status_code == 200
            lines = sse_lines(response)
    finally:
        publisher.stop()
    assert lines == ["event: response.created", 'data: {"type": "response.created"}',
                     "event: response.completed", 'data: {"type": "response.completed"}']


# -- virtual LLMs through the real publisher_client ---------------------------------

@pytest.fixture(scope="module")
def published(server, fake, tmp_path_factory):
    """The real publisher_client publishing an echo backend (every endpoint by
    default) and the FakeOpenAI as an `openai` backend that also serves
    responses and messages."""
    publisher = PublisherProcess(server, tmp_path_factory.mktemp("publisher"), [
        {"name": "virtual-echo", "type": "echo"},
        {"name": "virtual-fake", "type": "openai", "url": fake.url, "model": "local-model",
         "endpoints": EVERY}], heartbeat_seconds=5).start()
    yield publisher
    publisher.stop()


def test_the_publisher_declares_what_its_backends_serve(server, http, published):
    def endpoints(name):
        return http.get(f"{server.url}/api/v1/llms/{name}", headers=server.headers("client"),
                        timeout=10).json()["endpoints"]
    assert endpoints("virtual-echo") == EVERY
    assert endpoints("virtual-fake") == EVERY


def test_the_echo_backend_answers_every_endpoint_through_the_relay(sdk, claude, published):
    assert sdk.completions.create(model="virtual-echo", prompt="a b").choices[0].text == "a b"
    vectors = sdk.embeddings.create(model="virtual-echo", input=["a", "b"]).data
    assert [v.embedding for v in vectors] == [echo_embedding_of("a"), echo_embedding_of("b")]
    assert sdk.responses.create(model="virtual-echo", input="hi there").output_text == "hi there"
    message = claude.messages.create(model="virtual-echo", max_tokens=9,
                                     messages=[{"role": "user", "content": "hello claude"}])
    assert message.content[0].text == "hello claude"
    text = "".join(chunk.choices[0].text for chunk in sdk.completions.create(
        model="virtual-echo", prompt="one two three", stream=True))
    assert text == "one two three"


def test_a_virtual_stream_keeps_its_event_lines_and_adds_no_done(server, http, sdk, claude,
                                                               published):
    with post(server, http, "messages", {"model": "virtual-echo", "max_tokens": 9, "stream": True,
                                         "messages": [{"role": "user", "content": "a b"}]},
              stream=True) as response:
        assert response.status_code == 200
        lines = sse_lines(response)
    names = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    assert not any("[DONE]" in line for line in lines)
    with claude.messages.stream(model="virtual-echo", max_tokens=9,
                                messages=[{"role": "user", "content": "x y z"}]) as stream:
        assert "".join(stream.text_stream) == "x y z"
    with sdk.responses.create(model="virtual-echo", input="p q", stream=True) as events:
        kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.output_text.delta",
                     "response.output_text.delta", "response.completed"]


def test_a_backends_events_reach_the_client_in_order_through_the_publisher(
        server, http, fake, claude, sdk, published):
    with claude.messages.stream(model="virtual-fake", max_tokens=9,
                                messages=[{"role": "user", "content": "from the fake"}]) as stream:
        assert "".join(stream.text_stream) == "from the fake"
    sent = fake.requests_to("messages")[-1]
    assert sent["json"]["model"] == "local-model" and sent["json"]["stream"] is True
    with sdk.responses.create(model="virtual-fake", input="r s t", stream=True) as events:
        deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["r", " s", " t"]
    vectors = sdk.embeddings.create(model="virtual-fake", input=["v"]).data
    assert vectors[0].embedding == embedding_of("v")
    assert "stream" not in fake.requests_to("embeddings")[-1]["json"]
