"""`endpoints` on LLM rows through the app: CRUD, the register payload, the
view, and what a call to an endpoint a row does not list answers (public
upstreams faked with `responses`; tests/test_e2e_endpoints.py has the SDKs)."""
import pytest
import responses

URL = "http://box.test/v1"


@pytest.fixture
def admin(client, auth):
    def call(method, path, body=None):
        return client.open(f"/api/v1{path}", method=method, json=body, headers=auth("admin"))
    return call


def test_an_llm_serves_chat_completions_unless_it_says_more(admin):
    assert admin("POST", "/llms", {"name": "plain", "model": "m", "url": URL}).json[
        "endpoints"] == ["chat/completions"]
    created = admin("POST", "/llms", {"name": "rich", "model": "m", "url": URL,
                                      "endpoints": ["embeddings", "messages"]})
    assert created.json["endpoints"] == ["embeddings", "messages"]
    patched = admin("PATCH", "/llms/rich", {"endpoints": ["responses"]})
    assert patched.json["endpoints"] == ["responses"]
    assert admin("GET", "/llms/rich").json["endpoints"] == ["responses"]


@pytest.mark.parametrize("endpoints, reason", [
    (["audio/speech"], "Must be one of"), ([], "Length must be between 1 and 5"),
    (["embeddings", "embeddings"], "Each endpoint may be listed once"),
    ("embeddings", "Not a valid list"), ([3], "Not a valid string"),
])
def test_an_endpoint_outside_the_five_is_a_400(admin, endpoints, reason):
    response = admin("POST", "/llms", {"name": "box", "model": "m", "url": URL,
                                       "endpoints": endpoints})
    assert response.status_code == 400
    assert response.json["error"]["message"].startswith("endpoints")
    assert reason in response.json["error"]["message"]


def test_a_publisher_declares_its_rows_endpoints_and_a_register_without_them_resets_them(
        client, auth):
    def register(llm):
        response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                               json={"session_id": "s1", "llms": [llm]})
        assert response.status_code == 201, response.json
        return response.json["llms"][0]["endpoints"]

    assert register({"name": "gpu", "model": "m", "endpoints": ["chat/completions",
                                                                "embeddings"]}) == [
        "chat/completions", "embeddings"]
    assert register({"name": "gpu", "model": "m"}) == ["chat/completions"]
    bad = client.post("/api/v1/publishers/register", headers=auth("publisher"), json={
        "llms": [{"name": "gpu", "model": "m", "endpoints": ["files"]}]})
    assert bad.status_code == 400
    assert bad.json["error"]["message"].startswith("llms.0.endpoints")


def test_a_call_to_an_endpoint_the_row_does_not_list_reaches_no_upstream(client, auth, admin):
    admin("POST", "/llms", {"name": "chatter", "model": "m", "url": URL})
    with responses.RequestsMock() as upstream:  # any call out would fail the test
        response = client.post("/v1/embeddings", headers=auth("client"),
                               json={"model": "chatter", "input": "x"})
        assert len(upstream.calls) == 0
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "endpoint_not_supported"
    assert error["details"] == {"endpoints": ["chat/completions"]}
    assert error["message"] == ("LLM 'chatter' does not serve /v1/embeddings; "
                                "it serves /v1/chat/completions")


def test_an_unknown_model_on_a_new_route_points_at_v1_models(client, auth):
    response = client.post("/v1/completions", headers=auth("client"),
                           json={"model": "ghost", "prompt": "x"})
    assert response.status_code == 404
    assert "GET /v1/models lists the models you can use" in response.json["error"]["message"]


def test_an_upstream_that_answers_with_an_error_status_keeps_it_on_every_route(
        client, auth, admin):
    admin("POST", "/llms", {"name": "every", "model": "m", "url": URL,
                            "endpoints": ["completions", "responses", "messages"]})
    with responses.RequestsMock() as upstream:
        for path in ("completions", "responses", "messages"):
            upstream.post(f"{URL}/{path}", status=422, json={"detail": f"{path} says no"})
        for path, body in (("completions", {"prompt": "x"}), ("responses", {"input": "x"}),
                           ("messages", {"messages": [{"role": "user", "content": "x"}]})):
            response = client.post(f"/v1/{path}", headers=auth("client"),
                                   json={"model": "every", **body})
            assert (response.status_code, response.json) == (422, {"detail": f"{path} says no"})
