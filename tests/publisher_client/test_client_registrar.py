"""The seeds' VirtualLlmRegistrar tests, ported: what register sends, the
sticky session id, and the initial status rule."""
import json
import os
import stat

import pytest
import requests
import responses

from publisher_client import Publisher
from publisher_client.errors import ServerError, ServerUnavailable
from tests.publisher_client.helpers import API, BACKEND, calls_to, register_reply, sent_json

WAKE = {"type": "http", "url": "http://localhost:9999/wake", "max_wait_seconds": 1}


def llm(**fields):
    return {"name": "vllm-local", "type": "openai", "url": BACKEND, "model": "m", **fields}


def test_register_sends_the_llms_and_the_bearer_token(make_config, mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    Publisher(make_config()).register()

    call = mocked.calls[0]
    assert call.request.headers["Authorization"] == "Bearer tok-abc"
    assert sent_json(call) == {
        "session_id": None,
        "llms": [{"name": "vllm-local", "type": "openai", "model": "qwen", "tier": "fast",
                  "max_concurrency": 4, "initial_status": "active",
                  "endpoints": ["chat/completions", "completions", "embeddings"]}],
    }


def test_register_keeps_backend_settings_local(make_config, mocked):
    """url, api key and the wake recipe never reach the server (it rejects
    unknown fields, and the key is a secret); max_concurrency does: it is the
    row's capacity there."""
    mocked.get(f"{BACKEND}/models", json={"data": []})
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    config = make_config(environ={"VLLM_KEY": "sk-secret"},
                         llms=[llm(description="the GPU box", extra_config={"ctx": 8192},
                                   api_key_env="VLLM_KEY", max_concurrency=2, wake=WAKE)])

    Publisher(config).register()

    sent = sent_json(calls_to(mocked, "POST", "/register")[0])["llms"][0]
    assert sent == {"name": "vllm-local", "type": "openai", "model": "m",
                    "description": "the GPU box", "extra_config": {"ctx": 8192},
                    "max_concurrency": 2, "initial_status": "active",
                    "endpoints": ["chat/completions", "completions", "embeddings"]}
    assert "sk-secret" not in calls_to(mocked, "POST", "/register")[0].request.body.decode()


def test_register_publishes_the_configured_agents(make_config, mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    agent = {"name": "local-coder", "llm": "vllm-local", "system_prompt": "You review diffs.",
             "default_params": {"temperature": 0.2}}

    Publisher(make_config(agents=[agent])).register()

    assert sent_json(mocked.calls[0])["agents"] == [agent]


def test_sticky_session_id_is_persisted_and_sent_on_the_next_start(make_config, mocked):
    config = make_config()
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-42"), status=201)

    Publisher(config).register()
    Publisher(config).register()   # a restart

    saved = json.loads(config.session_file.read_text())
    assert saved["session_id"] == "sess-42"
    assert stat.S_IMODE(os.stat(config.session_file).st_mode) == 0o600
    assert sent_json(mocked.calls[1])["session_id"] == "sess-42"


def test_saving_the_session_id_never_writes_through_a_planted_symlink(make_config, mocked):
    """The temp file's name is not predictable and it is created O_EXCL."""
    config = make_config()
    config.session_file.parent.mkdir(parents=True)
    victim = config.session_file.parent / "victim"
    victim.write_text("precious")
    for pid in range(os.getpid() - 5, os.getpid() + 5):   # the old name: .<file>.<pid>.tmp
        (config.session_file.parent / f".session.json.{pid}.tmp").symlink_to(victim)
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-42"), status=201)

    Publisher(config).register()

    assert victim.read_text() == "precious"
    assert not config.session_file.is_symlink()
    assert json.loads(config.session_file.read_text())["session_id"] == "sess-42"


def test_a_corrupt_session_file_is_replaced_not_a_crash(make_config, mocked):
    config = make_config()
    config.session_file.parent.mkdir(parents=True)
    config.session_file.write_text("{not json")
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-new"), status=201)

    Publisher(config).register()

    assert sent_json(mocked.calls[0])["session_id"] is None
    assert json.loads(config.session_file.read_text())["session_id"] == "sess-new"


def test_a_session_id_owned_by_another_token_is_dropped_for_a_new_session(make_config, mocked):
    config = make_config()
    config.session_file.parent.mkdir(parents=True)
    config.session_file.write_text(json.dumps({"session_id": "theirs"}))
    mocked.post(f"{API}/publishers/register", status=403,
                json={"error": {"message": "session belongs to another token",
                                "code": "foreign_session"}})
    mocked.post(f"{API}/publishers/register", json=register_reply("ours"), status=201)

    assert Publisher(config).register() == "ours"

    assert [sent_json(c)["session_id"] for c in mocked.calls] == ["theirs", None]


def test_another_403_on_register_keeps_the_session_and_raises(make_config, mocked):
    config = make_config()
    config.session_file.parent.mkdir(parents=True)
    config.session_file.write_text(json.dumps({"session_id": "ours"}))
    mocked.post(f"{API}/publishers/register", status=403,
                json={"error": {"message": "Agent 'x' must run on one of this session's LLMs",
                                "code": "foreign_llm"}})

    with pytest.raises(ServerError) as raised:
        Publisher(config).register()

    assert raised.value.code == "foreign_llm"
    assert [sent_json(c)["session_id"] for c in mocked.calls] == ["ours"]


def test_hibernating_when_the_backend_is_down_and_a_wake_recipe_exists(make_config, mocked):
    mocked.get(f"{BACKEND}/models", body=requests.ConnectionError("refused"))
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    Publisher(make_config(llms=[llm(wake=WAKE)])).register()

    assert sent_json(calls_to(mocked, "POST", "/register")[0])["llms"][0]["initial_status"] \
        == "hibernating"


def test_active_when_the_backend_is_up_even_with_a_wake_recipe(make_config, mocked):
    mocked.get(f"{BACKEND}/models", json={"data": [{"id": "m"}]})
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    Publisher(make_config(llms=[llm(wake=WAKE)])).register()

    assert sent_json(calls_to(mocked, "POST", "/register")[0])["llms"][0]["initial_status"] \
        == "active"


def test_active_without_a_wake_recipe_even_when_the_backend_is_down(make_config, mocked):
    """The legacy path: without a recipe the backend is not even probed."""
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    Publisher(make_config(llms=[llm()])).register()

    assert sent_json(mocked.calls[0])["llms"][0]["initial_status"] == "active"
    assert len(mocked.calls) == 1


def test_a_backend_answering_non_2xx_to_the_probe_counts_as_down(make_config, mocked):
    mocked.get(f"{BACKEND}/models", status=503)
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    Publisher(make_config(llms=[llm(wake=WAKE)])).register()

    assert sent_json(calls_to(mocked, "POST", "/register")[0])["llms"][0]["initial_status"] \
        == "hibernating"


@pytest.mark.parametrize("status", [400, 401, 409])
def test_register_raises_when_the_server_answers_non_201(make_config, mocked, status):
    mocked.post(f"{API}/publishers/register", status=status,
                json={"error": {"message": "LLM 'vllm-local' is public", "type": "conflict",
                                "code": "name_taken", "details": {}}})

    with pytest.raises(ServerError) as raised:
        Publisher(make_config()).register()

    assert raised.value.status == status
    assert "LLM 'vllm-local' is public" in str(raised.value)


def test_register_raises_server_unavailable_on_5xx(make_config, mocked):
    mocked.post(f"{API}/publishers/register", status=502, body="bad gateway")

    with pytest.raises(ServerUnavailable):
        Publisher(make_config()).register()


def test_every_server_call_has_a_connect_and_read_timeout(make_config, mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    mocked.post(f"{API}/publishers/sess-1/heartbeat", json={"ok": True})
    mocked.get(f"{API}/publishers/sess-1/tasks", json={"tasks": []})
    mocked.delete(f"{API}/publishers/sess-1", status=204)
    publisher = Publisher(make_config(poll_wait_seconds=20))

    publisher.register()
    publisher.heartbeat()
    publisher.api.poll("sess-1", 20)
    publisher.shutdown()

    timeouts = {c.request.method + " " + c.request.path_url.split("?")[0]:
                c.request.req_kwargs["timeout"] for c in mocked.calls}
    assert all(isinstance(t, tuple) and len(t) == 2 for t in timeouts.values()), timeouts
    assert timeouts["GET /api/v1/publishers/sess-1/tasks"][1] > 20   # longer than the wait


def test_shutdown_deletes_the_session(make_config, mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    mocked.delete(f"{API}/publishers/sess-1", status=204)
    publisher = Publisher(make_config())
    publisher.register()

    publisher.shutdown()

    assert calls_to(mocked, "DELETE", "/publishers/sess-1")


def test_run_returns_after_stop_and_disconnects(make_config, mocked):
    mocked.get(f"{BACKEND}/models", json={"data": []})   # the backend check at start
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    publisher = Publisher(make_config(heartbeat_seconds=60))

    def poll(request):
        publisher.stop()
        return 200, {}, json.dumps({"tasks": []})

    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks", callback=poll)
    mocked.delete(f"{API}/publishers/sess-1", status=204)

    publisher.run()

    assert [c.request.method for c in mocked.calls] == ["GET", "POST", "GET", "DELETE"]


def test_an_unwritable_session_file_is_a_warning_not_a_crash(make_config, mocked, tmp_path,
                                                             caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    session_id = Publisher(make_config(session_file=str(blocker / "session.json"))).register()

    assert session_id == "sess-1"
    assert "could not save the session id" in caplog.text


# -- a wrong `server`, a backend that is down ------------------------------------

WERKZEUG_404 = ("<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n"
                "<h1>Not Found</h1>\n<p>The requested URL was not found on the server. If you "
                "entered the URL manually please check your spelling and try again.</p>\n")


@pytest.mark.parametrize("reply", [
    {"body": WERKZEUG_404, "content_type": "text/html"},
    {"json": {"error": {"message": "Not Found", "type": "not_found_error", "code": "not_found",
                        "details": {}}}},
])
def test_a_404_on_register_says_what_server_should_be_in_one_line(make_config, mocked, reply):
    mocked.post(f"{API}/publishers/register", status=404, **reply)

    with pytest.raises(ServerError) as raised:
        Publisher(make_config()).register()

    assert str(raised.value) == (
        f"POST {API}/publishers/register: 404: no Switchboard there; check `server`: it must "
        "be Switchboard's base URL (e.g. http://127.0.0.1:8000), the one `make run` serves, "
        "without /api/v1")


def test_a_404_for_an_agents_missing_llm_keeps_the_servers_message(make_config, mocked):
    mocked.post(f"{API}/publishers/register", status=404, json={"error": {
        "message": "LLM 'nope' not found", "type": "not_found_error", "code": "llm_not_found",
        "details": {}}})

    with pytest.raises(ServerError, match="404 LLM 'nope' not found"):
        Publisher(make_config()).register()


def test_a_backend_down_at_start_is_a_warning_naming_it(make_config, mocked, caplog):
    mocked.get(f"{BACKEND}/models", body=requests.ConnectionError("refused"))
    mocked.post(f"{API}/publishers/register", status=401, json={"error": {
        "message": "Unknown token", "type": "authentication_error", "code": "invalid_token",
        "details": {}}})

    with caplog.at_level("WARNING"), pytest.raises(ServerError):
        Publisher(make_config()).run()   # the check comes first, before the register

    [record] = [r for r in caplog.records if "backend" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        f"backend of LLM vllm-local is not available (GET {BACKEND}/models failed): requests "
        "to it fail until it answers")


def test_a_backend_with_a_wake_recipe_down_at_start_is_woken_later(make_config, mocked, caplog):
    mocked.get(f"{BACKEND}/models", status=503)

    with caplog.at_level("WARNING"):
        down = Publisher(make_config(llms=[llm(wake=WAKE)])).check_backends()

    assert down == ["vllm-local"]
    assert "published hibernating and woken by its recipe on the first request" in caplog.text


def test_an_answering_backend_gives_no_warning(make_config, mocked, caplog):
    mocked.get(f"{BACKEND}/models", json={"data": []})

    with caplog.at_level("WARNING"):
        assert Publisher(make_config()).check_backends() == []

    assert caplog.text == ""
