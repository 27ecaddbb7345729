"""Inference on public LLMs through the app (the upstream faked with `responses`):
`/api/v1/llms/<name>/infer` and the OpenAI-compatible `/v1` aliases."""
import json

import pytest
from responses import matchers

from extensions import db
from models import Kind, Llm, Status

UPSTREAM = "http://upstream.test/v1"
COMPLETIONS = f"{UPSTREAM}/chat/completions"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"id": "c1", "object": "chat.completion",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}}]}


@pytest.fixture
def llm(client, auth):
    response = client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "gpt-x", "model": "row-model", "url": UPSTREAM, "api_key": "sk-stored"})
    assert response.status_code == 201


@pytest.fixture
def infer(client, auth, llm):
    def call(body=CHAT, name="gpt-x", **kwargs):
        return client.post(f"/api/v1/llms/{name}/infer", json=body, headers=auth("client"),
                           **kwargs)
    return call


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    return response.json["error"]


# -- /api/v1/llms/<name>/infer ---------------------------------------------------

def test_infer_returns_the_upstreams_completion(infer, upstream):
    upstream.post(COMPLETIONS, json=COMPLETION)
    response = infer()
    assert response.status_code == 200
    assert response.json == COMPLETION


def test_infer_sends_the_rows_model_and_key(infer, upstream):
    upstream.post(COMPLETIONS, json=COMPLETION, match=[
        matchers.header_matcher({"Authorization": "Bearer sk-stored"}),
        matchers.json_params_matcher({**CHAT, "model": "row-model"})])
    assert infer({**CHAT, "model": "whatever-the-client-said"}).status_code == 200


def test_infer_passes_fields_it_does_not_know_untouched(infer, upstream):
    extras = {"tools": [{"type": "function", "function": {"name": "f"}}], "seed": 3,
              "response_format": {"type": "json_object"}, "logprobs": True,
              "vendor_extra": {"nested": [1, 2]}, "temperature": 0.2, "max_tokens": 9}
    upstream.post(COMPLETIONS, json=COMPLETION, match=[
        matchers.json_params_matcher({**CHAT, **extras, "model": "row-model"})])
    assert infer({**CHAT, **extras}).status_code == 200


def test_an_upstream_4xx_comes_back_with_its_body(infer, upstream):
    body = {"error": {"message": "context too long", "type": "invalid_request_error"}}
    upstream.post(COMPLETIONS, json=body, status=400)
    response = infer()
    assert response.status_code == 400
    assert response.json == body


def test_an_unreachable_upstream_is_a_502_envelope(infer, upstream):
    upstream.post(COMPLETIONS, body=ConnectionError("refused"))
    error = error_of(infer(), 502)
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_unreachable"
    assert "gpt-x" in error["message"]


def test_a_stream_is_relayed_as_server_sent_events(infer, upstream):
    body = (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
            b'data: {"choices": [{"delta": {"content": "b"}}]}\n\ndata: [DONE]\n\n')
    upstream.post(COMPLETIONS, body=body, content_type="text/event-stream")
    response = infer({**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.content_type.startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.data == body


def test_infer_on_an_unknown_llm_is_404(infer):
    error = error_of(infer(name="nope"), 404)
    assert error["code"] == "llm_not_found"
    assert "nope" in error["message"]


@pytest.mark.parametrize("body, field", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({**CHAT, "n": True}, "n"),
])
def test_an_invalid_chat_body_is_400_naming_the_field(infer, body, field):
    error = error_of(infer(body), 400)
    assert list(error["details"]) == [field]


def test_a_malformed_chat_body_is_400(client, auth, llm):
    response = client.post("/api/v1/llms/gpt-x/infer", data=b"{nope",
                           content_type="application/json", headers=auth("client"))
    assert error_of(response, 400)["code"] == "malformed_json"


# -- /v1 -------------------------------------------------------------------------

def add_inactive_virtual_llm(app):
    with app.app_context():
        db.session.add(Llm(name="sleeper", model="m", kind=Kind.VIRTUAL,
                           status=Status.INACTIVE))
        db.session.commit()


def test_v1_models_lists_usable_llms_by_name(app, client, auth, llm):
    add_inactive_virtual_llm(app)
    response = client.get("/v1/models", headers=auth("client"))
    assert response.status_code == 200
    assert response.json["object"] == "list"
    assert [m["id"] for m in response.json["data"]] == ["gpt-x", "pool:row-model"]
    model = response.json["data"][0]
    assert model["object"] == "model"
    assert isinstance(model["created"], int)


def test_v1_chat_completions_routes_by_model_name(client, auth, llm, upstream):
    upstream.post(COMPLETIONS, json=COMPLETION, match=[
        matchers.json_params_matcher({**CHAT, "model": "row-model"})])
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-x"},
                           headers=auth("client"))
    assert response.status_code == 200
    assert response.json == COMPLETION


def test_v1_chat_completions_with_an_unknown_model_is_404(client, auth, llm):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"},
                           headers=auth("client"))
    error = error_of(response, 404)
    assert error["message"] == "LLM 'nope' not found; GET /v1/models lists the models you can use"


@pytest.mark.parametrize("model", [None, "", 5])
def test_v1_chat_completions_needs_a_model_name(client, auth, llm, model):
    body = {**CHAT} if model is None else {**CHAT, "model": model}
    response = client.post("/v1/chat/completions", json=body, headers=auth("client"))
    assert "model" in error_of(response, 400)["details"]


def test_v1_chat_completions_streams(client, auth, llm, upstream):
    body = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: [DONE]\n\n'
    upstream.post(COMPLETIONS, body=body, content_type="text/event-stream")
    response = client.post("/v1/chat/completions",
                           json={**CHAT, "model": "gpt-x", "stream": True},
                           headers=auth("client"))
    assert response.content_type.startswith("text/event-stream")
    assert response.data == body
    assert json.loads(response.data.split(b"\n\n")[0][6:])["choices"][0]["delta"] == {
        "content": "a"}


@pytest.mark.parametrize("app_config", [{"MAX_PENDING_PER_LLM": 1}])
def test_public_llm_past_max_pending_is_429_until_a_stream_closes(infer, upstream):
    sse = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    upstream.post(COMPLETIONS, body=sse, content_type="text/event-stream")
    upstream.post(COMPLETIONS, body=sse, content_type="text/event-stream")
    open_stream = infer({**CHAT, "stream": True})
    assert open_stream.status_code == 200
    refused = infer({**CHAT, "stream": True})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    open_stream.close()  # the first client is done: its slot is free again
    assert infer({**CHAT, "stream": True}).status_code == 200
