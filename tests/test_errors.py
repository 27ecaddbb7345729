"""Every error is OpenAI's envelope; a 500 says nothing of its cause; the api
key never leaves the server, in a response or a log line."""
import io
import logging

import pytest
import responses
import sqlalchemy as sa

from extensions import db
from tests.support.database import WriteLock

MAX_BODY = 4096
SECRET = "sk-very-secret-upstream-key"
UPSTREAM = "http://upstream.test/v1"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def app_config():
    return {"MAX_BODY_BYTES": MAX_BODY}


def envelope_of(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/json"
    error = response.json["error"]
    assert set(error) == {"message", "type", "code", "details"}
    return error


# -- Flask's own errors --------------------------------------------------------

def test_an_unknown_path_is_a_404_envelope(client):
    error = envelope_of(client.get("/nowhere"), 404)
    assert error["type"] == "not_found_error"


def test_an_unknown_api_path_is_a_404_envelope(client, auth):
    envelope_of(client.get("/api/v1/nowhere", headers=auth("admin")), 404)


def test_a_wrong_method_is_a_405_envelope_with_allow(client, auth):
    response = client.put("/api/v1/llms", headers=auth("admin"), json={})
    error = envelope_of(response, 405)
    assert error["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}


@pytest.mark.parametrize("path", ["/api/v1/llms", "/api/v1/llms/x/infer",
                                  "/v1/chat/completions"])
def test_a_body_over_max_body_bytes_is_a_413_envelope(client, auth, path):
    body = {"name": "x", "padding": "a" * MAX_BODY}
    response = client.post(path, json=body, headers=auth("admin"))
    assert envelope_of(response, 413)["code"] == "body_too_large"


def chunked(client, path, body: bytes, headers):
    """POST without Content-Length, as a chunked upload reaches the app under gunicorn."""
    return client.post(path, headers=headers, content_type="application/json",
                       environ_overrides={"wsgi.input": io.BytesIO(body),
                                          "wsgi.input_terminated": True,
                                          "HTTP_TRANSFER_ENCODING": "chunked"})


def test_a_chunked_body_over_max_body_bytes_is_a_413_envelope(client, auth):
    body = b'{"name": "x", "padding": "' + b"a" * MAX_BODY + b'"}'
    response = chunked(client, "/api/v1/llms", body, auth("admin"))
    assert envelope_of(response, 413)["code"] == "body_too_large"


def test_a_chunked_body_of_exactly_max_body_bytes_is_read(client, auth):
    body = b'{"name": "exact", "model": "m", "url": "http://127.0.0.1:9/v1", "description": "'
    body += b"a" * (MAX_BODY - len(body) - 2) + b'"}'
    assert len(body) == MAX_BODY
    assert chunked(client, "/api/v1/llms", body, auth("admin")).status_code == 201


def test_a_body_just_under_the_limit_is_read(client, auth):
    body = {"name": "big", "model": "m", "url": "http://127.0.0.1:9/v1"}
    body["description"] = "a" * (MAX_BODY - len(str(body)) - 40)
    response = client.post("/api/v1/llms", json=body, headers=auth("admin"))
    assert response.status_code == 201


def test_max_body_bytes_comes_from_the_environment(monkeypatch, tmp_path):
    from app import create_app

    monkeypatch.setenv("SWITCHBOARD_MAX_BODY_BYTES", "1234")
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}"})
    assert app.config["MAX_CONTENT_LENGTH"] == 1234


# -- 500 -------------------------------------------------------------------------

def test_a_500_never_echoes_the_exception_text(app, client, caplog):
    @app.get("/explode")
    def explode():
        raise RuntimeError("internal detail: /etc/secret.conf line 3")

    with caplog.at_level(logging.ERROR):
        response = client.get("/explode")
    error = envelope_of(response, 500)
    assert error == {"message": "Internal server error", "type": "server_error",
                     "code": "internal_error", "details": {}}
    assert b"secret.conf" not in response.data
    assert "secret.conf" in caplog.text  # the operator still sees it


def break_llm_inserts(app):
    """Make every INSERT into `llm` with an api key fail inside the database:
    on PostgreSQL a CHECK whose error quotes the whole row, the key among it
    (`DETAIL: Failing row contains (...)`); on SQLite a trigger writing to a
    table that is gone (an OperationalError whose statement carries the
    row's parameters)."""
    with app.app_context(), db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE llm ADD CONSTRAINT doomed CHECK (api_key IS NULL)"))
            return
        conn.execute(sa.text("CREATE TABLE doomed (x)"))
        conn.execute(sa.text("CREATE TRIGGER llm_insert_fails AFTER INSERT ON llm "
                             "BEGIN INSERT INTO doomed VALUES (NEW.api_key); END"))
        conn.execute(sa.text("DROP TABLE doomed"))


def test_a_database_failure_logs_neither_the_key_nor_answers_with_it(app, client, auth,
                                                                      caplog):
    break_llm_inserts(app)
    with caplog.at_level(logging.DEBUG):
        response = client.post("/api/v1/llms", headers=auth("admin"), json={
            "name": "gpt-x", "model": "m", "url": UPSTREAM, "api_key": SECRET})
    error = envelope_of(response, 500)
    assert error["message"] == "Internal server error"
    assert "unhandled database error" in caplog.text  # the failure was logged ...
    assert "INSERT INTO llm" in caplog.text          # ... with its statement ...
    assert SECRET not in caplog.text                 # ... but not the row's values
    assert SECRET.encode() not in response.data


# -- the api key -----------------------------------------------------------------

def test_the_api_key_appears_in_no_response_and_no_log_line(client, auth, caplog):
    admin = auth("admin")
    seen = []
    with caplog.at_level(logging.DEBUG), responses.RequestsMock() as upstream:
        upstream.post(f"{UPSTREAM}/chat/completions", json={"error": {"message": "nope"}},
                      status=401)
        upstream.post(f"{UPSTREAM}/chat/completions", body=ConnectionError("refused"))
        seen.append(client.post("/api/v1/llms", headers=admin, json={
            "name": "gpt-x", "model": "m", "url": UPSTREAM, "api_key": SECRET}))
        seen.append(client.post("/api/v1/llms", headers=admin, json={
            "name": "gpt-x", "model": "m", "url": UPSTREAM, "api_key": SECRET}))  # 409
        seen.append(client.post("/api/v1/llms", headers=admin, json={
            "name": "bad name", "model": "m", "url": UPSTREAM, "api_key": SECRET}))  # 400
        seen.append(client.get("/api/v1/llms", headers=admin))
        seen.append(client.get("/api/v1/llms/gpt-x", headers=admin))
        seen.append(client.patch("/api/v1/llms/gpt-x", headers=admin,
                                 json={"api_key": SECRET + "2", "description": "d"}))
        seen.append(client.get("/v1/models", headers=auth("client")))
        seen.append(client.post("/api/v1/llms/gpt-x/infer", json=CHAT, headers=auth("client")))
        seen.append(client.post("/api/v1/llms/gpt-x/infer", json=CHAT, headers=auth("client")))
    assert [r.status_code for r in seen] == [201, 409, 400, 200, 200, 200, 200, 401, 502]
    for response in seen:
        assert SECRET.encode() not in response.data
        assert SECRET not in str(response.headers)
    assert '"api_key"' not in seen[3].get_data(as_text=True)
    assert caplog.records  # the logging was live
    assert SECRET not in caplog.text


def test_the_key_is_not_in_an_llms_repr(app, client, auth):
    from models import Llm

    client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "gpt-x", "model": "m", "url": UPSTREAM, "api_key": SECRET})
    with app.app_context():
        llm = db.session.scalar(sa.select(Llm))
        assert SECRET not in repr(llm)
        # stored encrypted, for the upstream call
        assert app.extensions["api_key_cipher"].decrypt(llm.api_key, "gpt-x") == SECRET


@pytest.mark.parametrize("app_config", [{"SQLITE_BUSY_TIMEOUT": 0.2,
                                         "DATABASE_LOCK_TIMEOUT": 0.2}])
def test_write_blocked_by_another_process_lock_is_503_with_retry_after(app, client, auth):
    client.get("/api/v1/llms", headers=auth("admin"))  # the token's last_used_at is written
    holder = WriteLock(app)
    holder.take()  # what a gc-sweep from cron holds on SQLite while it runs
    try:
        response = client.post("/api/v1/llms", headers=auth("admin"), json={
            "name": "blocked", "model": "m", "url": "http://127.0.0.1:9/v1"})
    finally:
        holder.close()
    assert envelope_of(response, 503)["code"] == "database_busy"
    assert response.headers["Retry-After"] == "1"
