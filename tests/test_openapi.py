"""`GET /api/v1/openapi.json`: the OpenAPI document of every route under
/api/v1 and /v1 (DESIGN.md, "Operations"). tests/test_openapi_fuzz.py runs
schemathesis against it on a live server."""
import pytest

from schemas.openapi import DOCUMENTED_PREFIXES, OPERATIONS, openapi_path


@pytest.fixture
def document(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def routes(app):
    """(OpenAPI path, method) of every route the app serves under /api/v1 and /v1."""
    return {(openapi_path(rule.rule)[0], method.lower())
            for rule in app.url_map.iter_rules() if rule.rule.startswith(DOCUMENTED_PREFIXES)
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_the_document_is_open_and_openapi_3(client):
    response = client.get("/api/v1/openapi.json")  # no token
    assert response.status_code == 200
    assert response.get_json()["openapi"].startswith("3.")


def test_every_route_is_in_the_document(app, document):
    """A new route under /api/v1 or /v1 without an entry in schemas/openapi.py
    OPERATIONS fails here."""
    documented = {(path, method) for path, operations in document["paths"].items()
                  for method in operations}
    missing = sorted(routes(app) - documented)
    assert not missing, f"routes missing from the OpenAPI document: {missing}"
    assert documented == routes(app)


def test_every_documented_operation_names_a_real_endpoint(app):
    stale = sorted(set(OPERATIONS) - set(app.view_functions))
    assert not stale, f"schemas/openapi.py OPERATIONS names endpoints that do not exist: {stale}"


def test_every_operation_documents_its_errors_in_the_envelope(document):
    for path, operations in document["paths"].items():
        # Anthropic's SDKs read only Anthropic's envelope.
        envelope = {"$ref": "#/components/schemas/" + (
            "AnthropicError" if path == "/v1/messages" else "Error")}
        for method, operation in operations.items():
            errors = {status: answer for status, answer in operation["responses"].items()
                      if int(status) >= 400}
            assert "400" in errors and "503" in errors, (method, path)
            if operation.get("security") != []:
                assert "401" in errors, (method, path)
            for status, answer in errors.items():
                assert answer["content"]["application/json"]["schema"] == envelope, \
                    (method, path, status)
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]


def test_request_bodies_come_from_the_marshmallow_schemas(document):
    create_llm = document["paths"]["/api/v1/llms"]["post"]
    assert create_llm["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LlmCreate"}
    llm_create = document["components"]["schemas"]["LlmCreate"]
    assert set(llm_create["required"]) == {"name", "model", "url"}
    assert llm_create["additionalProperties"] is False  # unknown fields are a 400
    assert llm_create["properties"]["api_key"]["writeOnly"] is True
    # Names: Python's \Z, written the JSON Schema way.
    assert llm_create["properties"]["name"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def test_answers_come_from_the_view_schemas(document, client, auth):
    created = client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "doc-llm", "model": "m", "url": "http://127.0.0.1:9/v1"})
    view = document["components"]["schemas"]["LlmView"]
    assert set(view["required"]) == set(created.get_json())
    assert "api_key" not in view["properties"]


def test_streamed_routes_document_event_streams(document):
    answer = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert set(answer["content"]) == {"application/json", "text/event-stream"}
