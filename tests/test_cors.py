"""CORS for browser clients: SWITCHBOARD_CORS_ORIGINS lists the origins that
may call /v1 and /api/v1 (with Authorization and Content-Type); any other
origin's preflight is refused with a 403 envelope, never a 401."""
import pytest

import settings

APP = "https://chat.example.com"
OTHER = "https://evil.example.net"


def preflight(client, path, origin, method="POST"):
    return client.options(path, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"})


@pytest.fixture
def app_config():
    return {"CORS_ORIGINS": f"{APP}, https://other-app.example.com"}


@pytest.mark.parametrize("path, method", [("/v1/chat/completions", "POST"),
                                          ("/v1/models", "GET"),
                                          ("/api/v1/llms/gpt-x/infer", "POST"),
                                          ("/api/v1/llms", "GET")])
def test_a_listed_origins_preflight_is_allowed(client, path, method):
    response = preflight(client, path, APP, method)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP
    allowed = {h.strip().lower() for h in
               response.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed >= {"authorization", "content-type"}
    assert method in response.headers["Access-Control-Allow-Methods"]


def test_a_listed_origins_calls_carry_cors_headers_errors_included(client, auth):
    ok = client.get("/v1/models", headers={**auth("client"), "Origin": APP})
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    refused = client.get("/v1/models", headers={"Origin": APP})
    assert refused.status_code == 401  # the page's script can read why
    assert refused.headers["Access-Control-Allow-Origin"] == APP


def test_another_origins_preflight_is_refused_with_a_403_envelope(client):
    response = preflight(client, "/v1/chat/completions", OTHER)
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    error = response.json["error"]
    assert error["code"] == "cors_origin_not_allowed"
    assert error["message"] == (f"Origin {OTHER} may not call this server from a browser; "
                                "an operator can allow it in SWITCHBOARD_CORS_ORIGINS")


def test_another_origins_calls_get_no_cors_headers(client, auth):
    response = client.get("/v1/models", headers={**auth("client"), "Origin": OTHER})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("app_config", [{}])
def test_without_the_setting_every_preflight_is_refused_without_a_401(client, auth):
    response = preflight(client, "/api/v1/llms", APP, "GET")
    assert response.status_code == 403
    assert response.json["error"]["code"] == "cors_origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in response.headers
    call = client.get("/api/v1/llms", headers={**auth("client"), "Origin": APP})
    assert "Access-Control-Allow-Origin" not in call.headers


def test_the_origins_come_from_the_environment(monkeypatch, tmp_path):
    from app import create_app

    monkeypatch.setenv("SWITCHBOARD_CORS_ORIGINS", f"{APP}/,http://localhost:3000")
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}"})
    assert settings.cors_origins(app.config) == [APP, "http://localhost:3000"]
