"""Bearer tokens on /api/v1 and /v1: 401 for who, 403 for what."""
from datetime import timedelta

import pytest
import sqlalchemy as sa

from extensions import db
from models import ApiToken, utcnow
from services import tokens as token_service
from services.cache import TtlMap

LLM = {"name": "gpt-x", "model": "m", "url": "http://127.0.0.1:9/v1"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}

PROTECTED = [
    ("get", "/api/v1/llms"),
    ("get", "/api/v1/llms/gpt-x"),
    ("post", "/api/v1/llms"),
    ("patch", "/api/v1/llms/gpt-x"),
    ("delete", "/api/v1/llms/gpt-x"),
    ("post", "/api/v1/llms/gpt-x/infer"),
    ("get", "/v1/models"),
    ("post", "/v1/chat/completions"),
]


@pytest.fixture
def llm(client, auth):
    assert client.post("/api/v1/llms", json=LLM, headers=auth("admin")).status_code == 201


def assert_401(response, code):
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.json["error"]["type"] == "authentication_error"
    assert response.json["error"]["code"] == code


def assert_403(response):
    assert response.status_code == 403, response.get_data(as_text=True)
    assert response.json["error"]["type"] == "permission_error"


@pytest.mark.parametrize("method, path", PROTECTED)
def test_no_token_is_401(client, method, path):
    assert_401(getattr(client, method)(path, json={}), "missing_token")


@pytest.mark.parametrize("method, path", PROTECTED)
def test_an_unknown_token_is_401(client, tokens, method, path):
    response = getattr(client, method)(path, json={},
                                       headers={"Authorization": "Bearer sb_not-a-token"})
    assert_401(response, "invalid_token")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "sb_token"])
def test_a_malformed_authorization_header_is_401(client, header):
    assert_401(client.get("/api/v1/llms", headers={"Authorization": header}), "missing_token")


def test_the_scheme_is_case_insensitive(client, tokens):
    response = client.get("/api/v1/llms", headers={"Authorization": f"bearer {tokens['client']}"})
    assert response.status_code == 200


def revoke(app, name):
    with app.app_context():
        token_service.revoke_token(db.session, name, utcnow())
        db.session.commit()


def test_a_revoked_token_is_401_once_the_workers_memory_of_it_lapses(app, client, auth):
    now = [0.0]
    app.extensions["token_cache"] = TtlMap(1.0, timer=lambda: now[0])
    assert client.get("/api/v1/llms", headers=auth("client")).status_code == 200
    revoke(app, "client-token")  # as `flask tokens revoke` does, from another process
    now[0] = 0.9  # the worker read the token a moment ago
    assert client.get("/api/v1/llms", headers=auth("client")).status_code == 200
    now[0] = 1.0
    assert_401(client.get("/api/v1/llms", headers=auth("client")), "revoked_token")


@pytest.mark.parametrize("app_config", [{"AUTH_CACHE_TTL": 0}])
def test_without_the_cache_a_revoked_token_is_401_at_once(app, client, auth):
    assert client.get("/api/v1/llms", headers=auth("client")).status_code == 200
    revoke(app, "client-token")
    assert_401(client.get("/api/v1/llms", headers=auth("client")), "revoked_token")


def test_healthz_needs_no_token(client):
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("role", ["admin", "publisher", "client"])
def test_every_role_can_read_llms(client, auth, llm, role):
    assert client.get("/api/v1/llms", headers=auth(role)).status_code == 200
    assert client.get("/api/v1/llms/gpt-x", headers=auth(role)).status_code == 200
    assert client.get("/v1/models", headers=auth(role)).status_code == 200


@pytest.mark.parametrize("role", ["publisher", "client"])
def test_only_admin_writes_llms(client, auth, llm, role):
    assert_403(client.post("/api/v1/llms", json={**LLM, "name": "other"}, headers=auth(role)))
    assert_403(client.patch("/api/v1/llms/gpt-x", json={"tier": "heavy"}, headers=auth(role)))
    assert_403(client.delete("/api/v1/llms/gpt-x", headers=auth(role)))
    assert client.get("/api/v1/llms/gpt-x", headers=auth("admin")).json["version"] == 1


def test_a_publisher_may_not_infer(client, auth, llm):
    assert_403(client.post("/api/v1/llms/gpt-x/infer", json=CHAT, headers=auth("publisher")))
    assert_403(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-x"},
                           headers=auth("publisher")))


def test_the_role_check_comes_before_the_body_check(client, auth):
    assert_403(client.post("/api/v1/llms", json={"kind": "virtual"}, headers=auth("client")))


def test_a_request_records_when_the_token_was_last_used(app, client, auth):
    client.get("/api/v1/llms", headers=auth("client"))
    with app.app_context():
        used = db.session.scalar(sa.select(ApiToken.last_used_at)
                                 .where(ApiToken.name == "client-token"))
    assert used is not None and utcnow() - used < timedelta(minutes=1)


def test_only_the_hash_of_a_token_is_stored(app, tokens):
    with app.app_context():
        stored = db.session.scalars(sa.select(ApiToken.token_hash)).all()
    assert tokens["client"] not in stored
    assert token_service.hash_token(tokens["client"]) in stored


@pytest.mark.parametrize("path", ["/api/v1/nope", "/v1/nope", "/api/v1/llms/x/nope"])
def test_unknown_api_path_without_a_token_is_401_not_404(client, path):
    response = client.get(path)
    assert response.status_code == 401


def test_unknown_api_path_with_a_token_is_404(client, auth):
    assert client.get("/api/v1/nope", headers=auth("client")).status_code == 404
