"""The OpenAI-compatible surface under /v1 (Flask's test client, real
database): which models are listed and retrievable, and what an unknown
model or route answers."""
import pytest

from extensions import db
from models import Kind, Llm, Status

UPSTREAM = "http://upstream.test/v1"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def admin(client, auth):
    def call(method, path, body=None):
        response = client.open(f"/api/v1{path}", method=method, json=body,
                               headers=auth("admin"))
        assert response.status_code < 300, response.json
        return response.json
    return call


@pytest.fixture
def public_llm(admin):
    admin("POST", "/llms", {"name": "gpt-x", "model": "m", "url": UPSTREAM})
    return "gpt-x"


def register(client, auth, *llms, agents=()):
    """Publish `llms` (name or (name, initial_status)) as a live session."""
    specs = [{"name": llm, "model": "m"} if isinstance(llm, str)
             else {"name": llm[0], "model": "m", "initial_status": llm[1]} for llm in llms]
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json={"llms": specs, "agents": list(agents)})
    assert response.status_code == 201, response.json
    return response.json["session_id"]


def add_rows(app, *rows):
    with app.app_context():
        db.session.add_all(rows)
        db.session.commit()


def orphaned_llm(name, status=Status.ACTIVE):
    """A virtual row whose publisher is gone without a DELETE (say, twelve
    minutes ago, before a server restart): no session is live for it."""
    return Llm(name=name, model="m", kind=Kind.VIRTUAL, status=status,
               provider_session_id="left-12-minutes-ago")


def model_ids(client, auth):
    response = client.get("/v1/models", headers=auth("client"))
    assert response.status_code == 200
    return [m["id"] for m in response.json["data"]]


def error_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    return response.json["error"]


# -- GET /v1/models --------------------------------------------------------------

def test_models_lists_public_llms_live_virtual_llms_and_hibernating_ones(
        app, client, auth, public_llm):
    register(client, auth, "live-one", ("live-asleep", "hibernating"))
    add_rows(app, orphaned_llm("orphan-active"), orphaned_llm("orphan-asleep", "hibernating"),
             orphaned_llm("gone", Status.INACTIVE))
    assert model_ids(client, auth) == ["gpt-x", "live-asleep", "live-one", "orphan-asleep",
                                       "pool:m"]


def test_models_lists_agents_only_on_usable_llms(app, client, auth, admin, public_llm):
    register(client, auth, "live-one", agents=[{"name": "helper", "llm": "live-one"}])
    admin("POST", "/agents", {"name": "reviewer", "llm": "gpt-x"})
    add_rows(app, orphaned_llm("orphan"))
    admin("POST", "/agents", {"name": "stranded", "llm": "orphan"})
    assert model_ids(client, auth) == ["gpt-x", "live-one", "pool:m", "agent:helper",
                                       "agent:reviewer"]


def test_a_disconnected_publishers_llms_leave_the_list(client, auth, public_llm):
    session_id = register(client, auth, "live-one")
    client.delete(f"/api/v1/publishers/{session_id}", headers=auth("publisher"))
    assert model_ids(client, auth) == ["gpt-x", "pool:m"]


# -- GET /v1/models/<id> ---------------------------------------------------------

def test_a_listed_model_is_retrieved_as_its_list_entry(client, auth, admin, public_llm):
    admin("POST", "/agents", {"name": "reviewer", "llm": "gpt-x"})
    listed = client.get("/v1/models", headers=auth("client")).json["data"]
    for entry in listed:
        response = client.get(f"/v1/models/{entry['id']}", headers=auth("client"))
        assert response.status_code == 200
        assert response.json == entry


def test_retrieving_an_unknown_model_is_404_pointing_at_the_list(client, auth):
    error = error_of(client.get("/v1/models/nope", headers=auth("client")), 404)
    assert error["message"] == ("LLM 'nope' not found; "
                                "GET /v1/models lists the models you can use")
    assert error["code"] == "llm_not_found"


def test_retrieving_a_model_whose_publisher_is_gone_is_404(app, client, auth):
    add_rows(app, orphaned_llm("orphan"))
    error = error_of(client.get("/v1/models/orphan", headers=auth("client")), 404)
    assert error["code"] == "model_unavailable"
    assert "GET /v1/models" in error["message"]


def test_retrieving_an_agent_on_an_unusable_llm_is_404(app, client, auth, admin):
    add_rows(app, orphaned_llm("orphan"))
    admin("POST", "/agents", {"name": "stranded", "llm": "orphan"})
    error = error_of(client.get("/v1/models/agent:stranded", headers=auth("client")), 404)
    assert error["code"] == "model_unavailable"


def test_retrieving_a_model_needs_a_token(client, public_llm):
    assert client.get("/v1/models/gpt-x").status_code == 401


# -- unknown routes and models ---------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/moderations"), ("GET", "/v1/files"), ("POST", "/v1/chat/completions/x"),
    ("GET", "/v1/"), ("GET", "/v1")])
def test_an_unknown_v1_route_is_an_envelope_naming_the_routes(client, auth, method, path):
    error = error_of(client.open(path, method=method, headers=auth("client")), 404)
    assert error["code"] == "unsupported_endpoint"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        f"{method} {path} is not an endpoint of this server; under /v1 it serves "
        "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, "
        "POST /v1/messages, GET /v1/models, GET /v1/models/{model}, POST /v1/responses")


def test_a_wrong_method_on_a_v1_route_is_still_405(client, auth):
    assert error_of(client.get("/v1/chat/completions", headers=auth("client")),
                    405)["code"] == "method_not_allowed"


def test_chat_completions_with_an_unknown_model_points_at_the_list(client, auth):
    response = client.post("/v1/chat/completions", headers=auth("client"),
                           json={**CHAT, "model": "nope"})
    assert error_of(response, 404)["message"] == (
        "LLM 'nope' not found; GET /v1/models lists the models you can use")


def test_chat_completions_with_an_unknown_agent_points_at_the_list(client, auth):
    response = client.post("/v1/chat/completions", headers=auth("client"),
                           json={**CHAT, "model": "agent:nope"})
    assert error_of(response, 404)["message"] == (
        "Agent 'nope' not found; GET /v1/models lists the models you can use")


# -- validation messages ---------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"model": "gpt-x", "messages": []}, "messages: Shorter than minimum length 1."),
    ({"model": "gpt-x"}, "messages: Missing data for required field."),
    ({"model": "gpt-x", "messages": [{"content": "no role"}]},
     "messages.0: each message needs a string 'role'"),
    ({"model": "gpt-x", "messages": [{"role": "user"}], "stream": "yes"},
     "stream: Not a valid boolean."),
    ({"model": "gpt-x", "messages": [], "temperature": "hot", "n": "two"},
     "temperature: Not a valid number. (2 more errors in details)"),
    ({"messages": [{"role": "user"}]}, "model: Missing data for required field."),
    ({"model": 5, "messages": [{"role": "user"}]}, "model: Not a valid string."),
])
def test_a_400_names_the_first_field_and_its_reason(client, auth, public_llm, body, message):
    response = client.post("/v1/chat/completions", headers=auth("client"), json=body)
    error = error_of(response, 400)
    assert error["message"] == message
    assert error["code"] == "validation_failed"


def test_a_400_on_a_nested_field_names_its_path(client, auth):
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json={"llms": [{"name": "ok", "model": "m"}, {"model": "m"}]})
    assert error_of(response, 400)["message"] == "llms.1.name: Missing data for required field."


def test_a_400_for_an_unknown_field_says_so(client, auth):
    response = client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "x", "model": "m", "url": UPSTREAM, "status": "active"})
    assert error_of(response, 400)["message"] == "status: Unknown field."


def test_a_400_without_a_field_gives_the_schemas_reason(client, auth):
    response = client.post("/api/v1/tasks/t1/result", headers=auth("publisher"), json={})
    assert error_of(response, 400)["message"] == "give either {status, body} or {error}"
