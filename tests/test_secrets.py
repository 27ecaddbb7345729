"""Secrets at rest: upstream API keys are Fernet-encrypted with
SWITCHBOARD_SECRET_KEY; it and SECRET_KEY are generated into a private
instance folder when unset; a key that does not fit the database stops the
start-up with a clear message; the migration encrypts keys stored before."""
import os
import stat
import threading
import uuid

import flask_migrate
import pytest
import requests
import responses
import sqlalchemy as sa
from cryptography.fernet import Fernet

import settings
from app import create_app
from extensions import db
from models import Llm, utcnow
from services.api_keys import SecretKeyError
from tests.support import stack

UPSTREAM = "http://upstream.test/v1"
SECRET = "sk-live-upstream-secret"
BEFORE_ENCRYPTION, ENCRYPTION = "3f6c2b9d1e47", "7c2d4e6f8a10"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def stored_keys(app) -> dict:
    """{name: api_key} as the database holds them (no ORM, no cipher)."""
    with app.app_context(), db.engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT name, api_key FROM llm")).all())


def add_public_llm(client, auth, name="gpt-x", api_key=SECRET):
    response = client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": name, "model": "m", "url": UPSTREAM, "api_key": api_key})
    assert response.status_code == 201, response.json


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("SECRET_KEY", "SWITCHBOARD_SECRET_KEY", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- encrypted at rest ------------------------------------------------------------

def test_an_api_key_is_stored_as_ciphertext_and_sent_upstream_in_plain(app, client, auth):
    add_public_llm(client, auth)
    stored = stored_keys(app)["gpt-x"]
    assert SECRET not in stored
    assert Fernet(app.config["API_KEY_SECRET"]).decrypt(stored.encode()).decode() == SECRET
    with responses.RequestsMock() as upstream:
        upstream.post(f"{UPSTREAM}/chat/completions", json={"choices": []}, match=[
            responses.matchers.header_matcher({"Authorization": f"Bearer {SECRET}"})])
        response = client.post("/api/v1/llms/gpt-x/infer", headers=auth("client"),
                               json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200


def test_a_new_key_by_patch_is_encrypted_and_null_clears_it(app, client, auth):
    add_public_llm(client, auth)
    response = client.patch("/api/v1/llms/gpt-x", headers=auth("admin"),
                            json={"api_key": "sk-rotated"})
    assert response.json["has_api_key"] is True
    assert "sk-rotated" not in stored_keys(app)["gpt-x"]
    response = client.patch("/api/v1/llms/gpt-x", headers=auth("admin"), json={"api_key": None})
    assert response.json["has_api_key"] is False
    assert stored_keys(app)["gpt-x"] is None


def test_the_key_set_last_is_the_one_sent_upstream(app, client, auth):
    # A worker keeps the keys it decrypted: a key set again must not be shadowed.
    add_public_llm(client, auth)
    for key in (SECRET, "sk-rotated", SECRET):
        assert client.patch("/api/v1/llms/gpt-x", headers=auth("admin"),
                            json={"api_key": key}).status_code == 200
        with responses.RequestsMock() as upstream:
            upstream.post(f"{UPSTREAM}/chat/completions", json={"choices": []}, match=[
                responses.matchers.header_matcher({"Authorization": f"Bearer {key}"})])
            response = client.post("/api/v1/llms/gpt-x/infer", headers=auth("client"),
                                   json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, key


def test_an_empty_api_key_is_no_key(app, client, auth):
    add_public_llm(client, auth, api_key="")
    assert stored_keys(app)["gpt-x"] is None


def test_a_key_written_with_another_secret_is_a_500_and_never_sent(app, client, auth):
    add_public_llm(client, auth)
    foreign = Fernet(Fernet.generate_key()).encrypt(b"sk-other").decode()
    with app.app_context():
        db.session.execute(sa.update(Llm).values(api_key=foreign))
        db.session.commit()
    with responses.RequestsMock():  # any upstream call would fail the test
        response = client.post("/api/v1/llms/gpt-x/infer", headers=auth("client"),
                               json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 500
    error = response.json["error"]
    assert error["code"] == "api_key_unreadable"
    assert "gpt-x" in error["message"] and "SWITCHBOARD_SECRET_KEY" in error["message"]
    assert "sk-other" not in response.get_data(as_text=True)


# -- start-up ---------------------------------------------------------------------

def test_a_wrong_secret_key_stops_create_app_naming_the_llms(app, client, auth):
    add_public_llm(client, auth)
    with pytest.raises(SecretKeyError) as caught:
        create_app({"SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"],
                    "API_KEY_SECRET": Fernet.generate_key().decode()})
    message = str(caught.value)
    assert "does not decrypt the API keys stored in the database (1 of 1: gpt-x)" in message
    assert "Set SWITCHBOARD_SECRET_KEY to the key they were encrypted with" in message


def test_a_malformed_secret_key_stops_create_app_saying_how_to_make_one(clean_env, tmp_path):
    clean_env.setenv("SWITCHBOARD_SECRET_KEY", "hunter2")
    with pytest.raises(SecretKeyError) as caught:
        create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}"},
                   instance_path=str(tmp_path / "instance"))
    assert str(caught.value).startswith(
        "SWITCHBOARD_SECRET_KEY is not a valid key: it must be 32 url-safe base64-encoded "
        "bytes (make one with: python -c 'from cryptography.fernet import Fernet; ")


def test_the_server_refuses_to_start_with_a_key_that_does_not_decrypt(live_server_factory):
    first = live_server_factory({"SWITCHBOARD_SECRET_KEY": Fernet.generate_key().decode()})
    response = requests.post(f"{first.url}/api/v1/llms", headers=first.headers("admin"),
                             json={"name": "gpt-x", "model": "m", "url": UPSTREAM,
                                   "api_key": SECRET}, timeout=10)
    assert response.status_code == 201
    first.stop()
    with pytest.raises(Exception) as caught:  # another host, another generated key
        live_server_factory({"SWITCHBOARD_SECRET_KEY": Fernet.generate_key().decode()},
                            share_with=first)
    assert "SWITCHBOARD_SECRET_KEY does not decrypt the API keys stored in the database " \
           "(1 of 1: gpt-x)" in str(caught.value)
    assert SECRET not in str(caught.value)


# -- generated into the instance folder ---------------------------------------------

def test_unset_secrets_are_generated_into_a_private_instance_folder(clean_env, tmp_path):
    instance = tmp_path / "instance"
    app = create_app(instance_path=str(instance))
    assert mode(instance) == 0o700
    for name in ("SECRET_KEY", "SWITCHBOARD_SECRET_KEY"):
        assert mode(instance / name) == 0o600
    assert app.config["SECRET_KEY"] == (instance / "SECRET_KEY").read_text().strip()
    assert app.config["API_KEY_SECRET"] == (
        instance / "SWITCHBOARD_SECRET_KEY").read_text().strip()
    assert app.config["SECRET_KEY"] != app.config["API_KEY_SECRET"]
    again = create_app(instance_path=str(instance))
    assert (again.config["SECRET_KEY"], again.config["API_KEY_SECRET"]) == (
        app.config["SECRET_KEY"], app.config["API_KEY_SECRET"])


def test_start_up_says_where_the_secrets_come_from_and_what_several_hosts_need(
        clean_env, tmp_path, caplog):
    instance = tmp_path / "instance"
    with caplog.at_level("INFO", logger="app"):
        create_app(instance_path=str(instance))
    assert (f"SECRET_KEY and SWITCHBOARD_SECRET_KEY read from {instance}: with several hosts, "
            "set SECRET_KEY and SWITCHBOARD_SECRET_KEY in the environment instead, the same "
            "on every host") in caplog.text


def test_the_default_sqlite_file_is_private_to_its_owner(clean_env, tmp_path):
    instance = tmp_path / "instance"
    app = create_app(instance_path=str(instance))
    with app.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()
    files = sorted(p.name for p in instance.iterdir())
    assert "switchboard.db" in files
    for name in files:
        if name.startswith("switchboard.db"):  # -wal and -shm too, when present
            assert mode(instance / name) == 0o600, name


def test_an_existing_instance_folder_is_made_private(clean_env, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o755)
    create_app(instance_path=str(instance))
    assert mode(instance) == 0o700


def test_secrets_from_the_environment_are_used_and_kept_apart(clean_env, tmp_path):
    key = Fernet.generate_key().decode()
    clean_env.setenv("SWITCHBOARD_SECRET_KEY", key)
    clean_env.setenv("SECRET_KEY", "cookie-signing-secret")
    instance = tmp_path / "instance"
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}"},
                     instance_path=str(instance))
    assert app.config["API_KEY_SECRET"] == key
    assert app.config["SECRET_KEY"] == "cookie-signing-secret"
    assert not list(instance.glob("*SECRET_KEY"))  # nothing had to be generated


def test_processes_starting_at_once_generate_one_secret(tmp_path):
    barrier = threading.Barrier(16)
    values = []

    def start():
        barrier.wait()
        values.append(settings.instance_secret(str(tmp_path), "SWITCHBOARD_SECRET_KEY",
                                               lambda: Fernet.generate_key().decode()))
    threads = [threading.Thread(target=start) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(values) == 16 and len(set(values)) == 1
    assert os.listdir(tmp_path) == ["SWITCHBOARD_SECRET_KEY"]  # no draft left behind
    assert mode(tmp_path / "SWITCHBOARD_SECRET_KEY") == 0o600


def test_an_empty_secret_file_is_a_clear_error(tmp_path):
    (tmp_path / "SECRET_KEY").write_text("\n")
    with pytest.raises(RuntimeError, match="SECRET_KEY is empty: delete it"):
        settings.instance_secret(str(tmp_path), "SECRET_KEY", lambda: "x")


# -- the migration ----------------------------------------------------------------

@pytest.fixture
def before_encryption(tmp_path):
    """An app on a new database migrated to the revision before encryption,
    holding a public LLM with a plaintext key and one without a key."""
    url = stack.empty_database(tmp_path)
    app = create_app({"SQLALCHEMY_DATABASE_URI": stack.sqlalchemy_url(url)})
    with app.app_context():
        flask_migrate.upgrade(revision=BEFORE_ENCRYPTION)
        # Rows as that revision stores them (the models describe the head's tables).
        for name, api_key in (("keyed", SECRET), ("keyless", None)):
            db.session.execute(sa.text(
                "INSERT INTO llm (id, name, type, model, url, tier, description, api_key, "
                "extra_config, created_at, updated_at, kind, status, version) VALUES (:id, "
                ":name, 'openai', 'm', :url, 'fast', '', :key, '{}', :now, :now, 'public', "
                "'active', 1)"), {"id": uuid.uuid4().hex, "name": name, "url": UPSTREAM,
                                  "key": api_key, "now": utcnow()})
        db.session.commit()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    stack.drop_database(url)


def test_the_migration_encrypts_existing_keys_and_downgrade_restores_them(before_encryption):
    app = before_encryption
    fernet = Fernet(app.config["API_KEY_SECRET"])
    with app.app_context():
        flask_migrate.upgrade(revision=ENCRYPTION)
    keys = stored_keys(app)
    assert keys["keyless"] is None
    assert SECRET not in keys["keyed"]
    assert fernet.decrypt(keys["keyed"].encode()).decode() == SECRET
    with app.app_context():
        flask_migrate.downgrade(revision=BEFORE_ENCRYPTION)
    assert stored_keys(app) == {"keyed": SECRET, "keyless": None}


def test_downgrade_with_another_key_changes_nothing(before_encryption, capfd):
    app = before_encryption
    with app.app_context():
        flask_migrate.upgrade(revision=ENCRYPTION)
    encrypted = stored_keys(app)
    app.config["API_KEY_SECRET"] = Fernet.generate_key().decode()
    with app.app_context(), pytest.raises(SystemExit):  # `flask db downgrade` exits 1
        flask_migrate.downgrade(revision=BEFORE_ENCRYPTION)
    assert "The API key of LLM 'keyed' does not decrypt with this SWITCHBOARD_SECRET_KEY" \
        in capfd.readouterr().err
    assert stored_keys(app) == encrypted
    with app.app_context(), db.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == ENCRYPTION
