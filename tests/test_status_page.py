"""`/status` (DESIGN.md, "Operations"): the admin-token login, its cookie,
and what the page shows. tests/test_status_browser.py looks at it in Chromium."""
import re

import pytest

from extensions import db
from models import utcnow
from services import tokens as token_service


@pytest.fixture
def signed_in(client, tokens):
    response = client.post("/status/login", data={"token": tokens["admin"]})
    assert response.status_code == 303, response.text
    return client


def test_the_page_asks_for_a_login_first(client):
    response = client.get("/status")
    assert response.status_code == 303
    assert response.headers["Location"].endswith("/status/login")
    form = client.get("/status/login")
    assert form.status_code == 200
    assert 'name="token"' in form.text and 'type="password"' in form.text


def test_an_admin_token_signs_in_with_a_signed_httponly_samesite_cookie(client, tokens):
    response = client.post("/status/login", data={"token": tokens["admin"]})
    assert response.status_code == 303
    assert response.headers["Location"].endswith("/status")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("switchboard_status=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/status" in cookie
    assert tokens["admin"] not in cookie  # the token's id is in it, signed; never the token
    page = client.get("/status")
    assert page.status_code == 200
    assert "Switchboard status" in page.text and "signed in as admin-token" in page.text


def test_a_wrong_token_is_refused(client):
    response = client.post("/status/login", data={"token": "sb_not-a-token"})
    assert response.status_code == 401
    assert "not valid" in response.text
    assert "Set-Cookie" not in response.headers
    assert client.get("/status").status_code == 303


@pytest.mark.parametrize("role", ["client", "publisher"])
def test_a_non_admin_token_is_refused(client, tokens, role):
    response = client.post("/status/login", data={"token": tokens[role]})
    assert response.status_code == 403
    assert "not an admin token" in response.text
    assert tokens[role] not in response.text
    assert client.get("/status").status_code == 303


@pytest.mark.parametrize("form", [{}, {"token": ""}, {"token": "x", "extra": "y"},
                                  {"token": "x" * 513}])
def test_the_login_form_is_validated(client, form):
    assert client.post("/status/login", data=form).status_code == 400


def test_a_forged_cookie_is_not_a_login(app, client, tokens):
    """The cookie is signed with SECRET_KEY: one signed with another key is ignored."""
    app.secret_key, real = "another key", app.secret_key
    try:
        value = app.session_interface.get_signing_serializer(app).dumps({"token_id": "x"})
    finally:
        app.secret_key = real
    client.set_cookie("switchboard_status", value, path="/status")
    assert client.get("/status").status_code == 303


def test_a_revoked_token_signs_the_page_out(app, signed_in):
    assert signed_in.get("/status").status_code == 200
    with app.app_context():
        token_service.revoke_token(db.session, "admin-token", utcnow())
        db.session.commit()
    assert signed_in.get("/status").status_code == 303


def test_signing_out_ends_the_session(signed_in):
    response = signed_in.post("/status/logout")
    assert response.status_code == 303
    assert signed_in.get("/status").status_code == 303


def test_the_page_shows_llms_agents_sessions_and_refreshes(client, auth, signed_in):
    assert client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "upstream-gpt", "model": "gpt-x", "url": "http://127.0.0.1:9/v1",
        "max_concurrency": 3}).status_code == 201
    registered = client.post("/api/v1/publishers/register", headers=auth("publisher"), json={
        "llms": [{"name": "box-llm", "model": "qwen", "initial_status": "hibernating"}],
        "agents": [{"name": "box-agent", "llm": "box-llm"}]})
    assert registered.status_code == 201
    session_id = registered.get_json()["session_id"]
    page = signed_in.get("/status")
    assert page.status_code == 200
    html = page.text
    assert 'http-equiv="refresh"' in html
    for text in ('data-llm="upstream-gpt"', "gpt-x", 'data-llm="box-llm"', "hibernating",
                 'data-agent="box-agent"', f'data-session="{session_id}"', "publisher-token"):
        assert text in html, text


def test_the_page_loads_nothing_from_elsewhere(signed_in):
    page = signed_in.get("/status")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["Cache-Control"] == "no-store"
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page.text)
    assert "<script" not in page.text


def test_recent_errors_are_listed(client, auth, signed_in):
    session_id = client.post("/api/v1/publishers/register", headers=auth("publisher"), json={
        "llms": [{"name": "offline-llm", "model": "m"}]}).get_json()["session_id"]
    client.delete(f"/api/v1/publishers/{session_id}", headers=auth("publisher"))
    failed = client.post("/api/v1/llms/offline-llm/infer", headers=auth("client"),
                         json={"messages": [{"role": "user", "content": "hi"}]})
    assert failed.status_code == 503
    html = signed_in.get("/status").text
    section = html[html.index('id="errors"'):]
    assert "503" in section and "publisher_offline" in section
    assert "POST /api/v1/llms/offline-llm/infer" in section


def test_no_token_appears_on_the_page(client, tokens, signed_in):
    html = signed_in.get("/status").text
    for raw in tokens.values():
        assert raw not in html


def test_flow_control_health_checks_and_a_missing_bus_are_not_recorded(app):
    """A publisher held back (429 on its routes), /readyz, and bus_unavailable
    (recording would wait on the missing bus too) stay off the list; a
    client's 429 goes on it."""
    from blueprints.errors import error_response
    from blueprints.status import record_error_answer

    answers = [("/api/v1/tasks/t1/chunks", 429, "too_many_buffered_chunks"),
               ("/api/v1/publishers/s1/tasks", 429, "too_many_polls"),
               ("/readyz", 503, "not_ready"),
               ("/api/v1/llms/x/infer", 503, "bus_unavailable"),
               ("/api/v1/llms/x/infer", 429, "too_many_pending")]
    for path, status, code in answers:
        with app.test_request_context(path, method="POST" if "tasks/" in path else "GET"):
            record_error_answer(error_response(status, "m", "t", code))
    assert [e["code"] for e in app.extensions["recent_errors"].latest()] == ["too_many_pending"]
