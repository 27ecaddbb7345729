"""A NUL character (`\\x00`, `%00`) in a URL, or in anything the API stores,
is a 400 naming the field, on every engine: PostgreSQL's text and JSONB
cannot hold one (it used to be a 500 there), and SQLite would keep it and
hand it on. A body that is only relayed (an inference) keeps its NULs, and an
LLM's answer with one is stored with U+FFFD instead."""
import json

import pytest
import responses

API = "/api/v1"
UPSTREAM = "http://upstream.test/v1"
NUL = "Must not contain NUL characters."


def refused(response, message):
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.json["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "validation_failed")
    assert error["message"] == message
    return error


@pytest.fixture
def admin(client, auth):
    def call(method, path, body=None):
        return client.open(API + path, method=method, json=body, headers=auth("admin"))
    return call


@pytest.fixture
def llm(admin):
    assert admin("POST", "/llms", {"name": "up", "model": "m", "url": UPSTREAM}).status_code == 201
    return "up"


@pytest.fixture
def agent(admin, llm):
    assert admin("POST", "/agents", {"name": "bot", "llm": llm}).status_code == 201
    return "bot"


# -- the URL ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/llms/x%00y", "/api/v1/agents/%00/threads",
                                  "/v1/models/a%00", "/api/v1/threads/t%00/messages",
                                  "/api/v1/publishers/s%00/tasks", "/api/v1/llms?x=%00"])
def test_a_nul_in_the_url_is_a_400_envelope(client, auth, path):
    response = client.get(path, headers=auth("admin"))
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_url"
    assert "NUL" in response.json["error"]["message"]


def test_a_nul_in_the_url_is_a_400_before_any_token_is_looked_up(client):
    response = client.delete("/api/v1/llms/x%00", headers={"Authorization": "Bearer sb_x"})
    assert response.status_code == 400


# -- stored strings ---------------------------------------------------------------------

def test_a_nul_in_a_description_names_the_field(admin):
    refused(admin("POST", "/llms", {"name": "x", "model": "m", "url": UPSTREAM,
                                    "description": "a\x00b"}), f"description: {NUL}")


def test_a_nul_in_an_update_names_the_field(admin, llm):
    refused(admin("PATCH", f"/llms/{llm}", {"description": "\x00"}), f"description: {NUL}")


@pytest.mark.parametrize("extra_config, message", [
    ({"a": {"b": ["fine", "not\x00fine"]}}, f"extra_config.a.b.1: {NUL}"),
    ({"k\x00": 1}, "extra_config.k\\u0000: Keys must not contain NUL characters."),
    ({"deep": [[{"deeper": {"x": "\x00"}}]]}, f"extra_config.deep.0.0.deeper.x: {NUL}"),
])
def test_a_nul_at_any_depth_of_a_json_field_names_its_path(admin, extra_config, message):
    refused(admin("POST", "/llms", {"name": "x", "model": "m", "url": UPSTREAM,
                                    "extra_config": extra_config}), message)


def test_a_nul_in_an_agents_prompt_or_params_names_the_field(admin, llm):
    refused(admin("POST", "/agents", {"name": "a", "llm": llm, "system_prompt": "\x00"}),
            f"system_prompt: {NUL}")
    refused(admin("POST", "/agents", {"name": "a", "llm": llm,
                                      "default_params": {"vendor_extra": {"k": "\x00"}}}),
            f"default_params.vendor_extra.k: {NUL}")
    refused(admin("POST", "/agents", {"name": "a", "llm": llm,
                                      "default_params": {"stop": ["ok", "\x00"]}}),
            f"default_params.stop.1: {NUL}")


def test_a_nul_in_projects_prompts_and_personalities_names_the_field(admin, agent):
    refused(admin("POST", "/projects", {"name": "p", "description": "\x00"}),
            f"description: {NUL}")
    refused(admin("POST", "/prompts", {"name": "p", "content": "x\x00"}), f"content: {NUL}")
    refused(admin("POST", f"/agents/{agent}/personalities",
                  {"name": "p", "description": "\x00"}), f"description: {NUL}")


def test_a_nul_in_a_chat_message_a_tool_result_or_a_title_names_the_field(
        client, auth, agent):
    def chat(body):
        return client.post(f"{API}/agents/{agent}/chat", json=body, headers=auth("client"))

    refused(chat({"message": "hi\x00"}), f"message: {NUL}")
    refused(chat({"thread_id": "t", "tool_results": [{"tool_call_id": "c", "content": "\x00"}]}),
            f"tool_results.0.content: {NUL}")
    refused(client.post(f"{API}/agents/{agent}/threads", json={"title": "\x00"},
                        headers=auth("client")), f"title: {NUL}")


def test_a_nul_in_a_register_payload_names_the_item_and_field(client, auth):
    def register(body):
        return client.post(f"{API}/publishers/register", json=body, headers=auth("publisher"))

    refused(register({"llms": [{"name": "ok", "model": "m"},
                               {"name": "v", "model": "m", "description": "\x00"}]}),
            f"llms.1.description: {NUL}")
    refused(register({"llms": [{"name": "v", "model": "m"}],
                      "agents": [{"name": "a", "llm": "v", "extras": {"x": ["\x00"]}}]}),
            f"agents.0.extras.x.0: {NUL}")


def test_nothing_was_stored_by_the_refused_requests(admin):
    refused(admin("POST", "/llms", {"name": "x", "model": "m", "url": UPSTREAM,
                                    "description": "\x00"}), f"description: {NUL}")
    assert admin("GET", "/llms").json == []


# -- relayed, not stored --------------------------------------------------------------

def test_an_inference_body_keeps_its_nuls_on_the_way_to_the_upstream(client, auth, llm):
    with responses.RequestsMock() as upstream:
        upstream.post(f"{UPSTREAM}/chat/completions", json={"choices": [], "echo": "a\x00b"})
        response = client.post(f"{API}/llms/{llm}/infer", headers=auth("client"), json={
            "messages": [{"role": "user", "content": "x\x00y"}], "vendor": {"k\x00": "v"}})
        sent = json.loads(upstream.calls[0].request.body)
    assert response.status_code == 200
    assert response.json["echo"] == "a\x00b"
    assert sent["messages"][0]["content"] == "x\x00y"
    assert sent["vendor"] == {"k\x00": "v"}


def test_an_answer_with_a_nul_reaches_the_caller_and_is_stored_without_it(
        client, auth, agent):
    answer = {"choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "a\x00b"}}]}
    with responses.RequestsMock() as upstream:
        upstream.post(f"{UPSTREAM}/chat/completions", json=answer)
        response = client.post(f"{API}/agents/{agent}/chat", json={"message": "hi"},
                               headers=auth("client"))
    assert response.status_code == 200, response.json
    assert (response.json["assistant"], response.json["saved"]) == ("a\x00b", True)
    stored = client.get(f"{API}/threads/{response.json['thread_id']}/messages",
                        headers=auth("client")).json
    assert [(m["role"], m["content"], m["status"]) for m in stored] == [
        ("user", "hi", "complete"), ("assistant", "a\ufffdb", "complete")]
