"""deploy/nginx.conf as shipped, in front of a real gunicorn (DESIGN.md,
"Operations": nginx). Only its ports and paths are replaced
(tests/support/nginx.py); the two variants below say what else they change.

Needs Debian's `nginx`: skipped without it locally, a failure under CI
(`.ci/run` installs it)."""
import json
import shutil
import time

import pytest
import requests

from tests.support import nginx
from tests.support.fake_openai import ScriptedReply
from tests.support.live import free_port

STREAM_WORDS = ["one", " two", " three", " four"]
CHUNK_DELAY = 0.4


@pytest.fixture(scope="module", autouse=True)
def nginx_installed():
    nginx.nginx_binary()


@pytest.fixture(scope="module")
def server(module_live_server):
    return module_live_server


@pytest.fixture
def start_proxy():
    """start(upstream_port, replace=()) → a running nginx on the shipped config."""
    started = []

    def start(upstream_port, replace=()):
        folder = nginx.nginx_folder()
        config = nginx.shipped_config(listen_port=free_port(), upstream_port=upstream_port,
                                      folder=folder, replace=replace)
        proxy = nginx.start_nginx(config, folder)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
        shutil.rmtree(proxy.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(server):
    folder = nginx.nginx_folder()
    config = nginx.shipped_config(listen_port=free_port(), upstream_port=server.port,
                                  folder=folder)
    running = nginx.start_nginx(config, folder)
    yield running
    running.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture(scope="module")
def streaming_llm(server, module_fake_openai, http):
    response = http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"),
                         json={"name": "nginx-fake", "model": "m", "url": module_fake_openai.url})
    assert response.status_code == 201, response.text
    return "nginx-fake"


def assert_envelope(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert error["details"] == {}
    return error


def test_the_shipped_file_loads_as_it_is(tmp_path):
    """`nginx -t` on deploy/nginx.conf itself. Not root, nginx cannot open the
    Debian paths it names: then the copy with only paths replaced is checked."""
    if nginx.is_root():
        result = nginx.check_config(nginx.CONFIG)
    else:
        config = nginx.shipped_config(listen_port=8080, upstream_port=8000, folder=tmp_path)
        (tmp_path / "nginx.conf").write_text(config)
        result = nginx.check_config(tmp_path / "nginx.conf", str(tmp_path / "error.log"))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_a_25_second_long_poll_is_held_without_a_504(server, proxy, http):
    register = http.post(f"{proxy.url}/api/v1/publishers/register",
                         headers=server.headers("publisher"),
                         json={"llms": [{"name": "nginx-poller", "model": "m"}]}, timeout=10)
    assert register.status_code == 201, register.text
    session_id = register.json()["session_id"]
    started = time.monotonic()
    poll = http.get(f"{proxy.url}/api/v1/publishers/{session_id}/tasks", params={"wait": 25},
                    headers=server.headers("publisher"), timeout=40)
    elapsed = time.monotonic() - started
    assert poll.status_code == 200, poll.text
    assert poll.json() == {"tasks": []}
    assert elapsed >= 24.5


def read_stream(response):
    """(arrival time, event payload) of each SSE `data:` event, as it arrives."""
    events, buffer = [], b""
    for piece in response.iter_content(chunk_size=None):
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    events.append((time.monotonic(), line[6:].decode()))
    return events


def stream_through(base_url, server, http, fake, llm):
    fake.script(ScriptedReply(chunks=STREAM_WORDS, chunk_delay=CHUNK_DELAY))
    with http.post(f"{base_url}/v1/chat/completions", headers=server.headers("client"),
                   json={"model": llm, "stream": True,
                         "messages": [{"role": "user", "content": "count"}]},
                   stream=True, timeout=20) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return response, read_stream(response)


def assert_chunk_by_chunk(events):
    assert events[-1][1] == "[DONE]"
    words = [json.loads(data)["choices"][0]["delta"].get("content") for _, data in events[:-1]]
    assert "".join(w or "" for w in words) == "".join(STREAM_WORDS)
    times = [at for at, data in events[:-1] if json.loads(data)["choices"][0]["delta"]]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    # Each word left the upstream CHUNK_DELAY after the one before: a buffering
    # proxy would hand them over together at the end.
    assert len(gaps) == len(STREAM_WORDS) - 1
    assert all(gap > CHUNK_DELAY / 2 for gap in gaps), gaps


def test_a_stream_arrives_chunk_by_chunk(server, proxy, http, module_fake_openai,
                                         streaming_llm):
    module_fake_openai.reset()
    _, events = stream_through(proxy.url, server, http, module_fake_openai, streaming_llm)
    assert_chunk_by_chunk(events)


def test_streams_carry_x_accel_buffering_no(server, http, module_fake_openai, streaming_llm):
    """Straight from gunicorn: the header that tells nginx not to buffer this
    response (nginx consumes it; a client behind nginx never sees it)."""
    module_fake_openai.reset()
    response, _ = stream_through(server.url, server, http, module_fake_openai, streaming_llm)
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"


def test_x_accel_buffering_keeps_streaming_where_buffering_is_on(
        server, start_proxy, http, module_fake_openai, streaming_llm):
    """A variant with `proxy_buffering on` (a location an operator shares with
    other apps): the app's X-Accel-Buffering still streams chunk by chunk."""
    buffered = start_proxy(server.port, replace=[("proxy_buffering off;",
                                                  "proxy_buffering on;")])
    module_fake_openai.reset()
    response, events = stream_through(buffered.url, server, http, module_fake_openai,
                                      streaming_llm)
    assert_chunk_by_chunk(events)
    assert "X-Accel-Buffering" not in response.headers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversize_body_is_a_json_413(server, proxy, http, chunked):
    body = json.dumps({"model": "x", "messages": [
        {"role": "user", "content": "x" * (4 * 1024 * 1024 + 1)}]}).encode()
    data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    response = http.post(f"{proxy.url}/v1/chat/completions", data=data, timeout=20,
                         headers={**server.headers("client"),
                                  "Content-Type": "application/json"})
    error = assert_envelope(response, 413, "body_too_large")
    assert error["type"] == "invalid_request_error"


def test_a_body_under_the_limit_goes_through(server, proxy, http):
    """Bodies past nginx's in-memory buffer are spooled to its temp folder and
    still reach the app (3 MiB: the app answers, here a 404 for the model)."""
    response = http.post(f"{proxy.url}/v1/chat/completions", timeout=20,
                         headers=server.headers("client"),
                         json={"model": "no-such-model", "messages": [
                             {"role": "user", "content": "x" * (3 * 1024 * 1024)}]})
    assert_envelope(response, 404, "llm_not_found")


def test_an_unreachable_app_is_a_json_502(start_proxy, http):
    proxy = start_proxy(free_port())  # nothing listens there
    response = http.get(f"{proxy.url}/v1/models", timeout=10)
    error = assert_envelope(response, 502, "server_unreachable")
    assert error["type"] == "upstream_error"
    assert response.headers["Retry-After"] == "5"


def test_the_apps_own_502_passes_through(server, proxy, http):
    """nginx's error pages are for errors nginx makes; the app's own envelope
    (an upstream that cannot be reached) reaches the client as it is."""
    closed = free_port()
    created = http.post(f"{server.url}/api/v1/llms", headers=server.headers("admin"), json={
        "name": "nginx-dead-upstream", "model": "m", "url": f"http://127.0.0.1:{closed}/v1"})
    assert created.status_code == 201, created.text
    response = http.post(f"{proxy.url}/v1/chat/completions", headers=server.headers("client"),
                         json={"model": "nginx-dead-upstream",
                               "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
    assert response.status_code == 502
    assert response.json()["error"]["code"] != "server_unreachable"


def test_an_app_too_slow_for_the_proxy_timeout_is_a_json_504(server, start_proxy, http):
    """A variant with a 1 s `proxy_read_timeout` (the shipped 660 s is above
    every wait of the app): a 3 s poll outlives it."""
    proxy = start_proxy(server.port, replace=[("proxy_read_timeout 660s;",
                                               "proxy_read_timeout 1s;")])
    register = http.post(f"{proxy.url}/api/v1/publishers/register",
                         headers=server.headers("publisher"),
                         json={"llms": [{"name": "nginx-slow-poller", "model": "m"}]}, timeout=10)
    assert register.status_code == 201, register.text
    response = http.get(f"{proxy.url}/api/v1/publishers/{register.json()['session_id']}/tasks",
                        params={"wait": 3}, headers=server.headers("publisher"), timeout=10)
    error = assert_envelope(response, 504, "proxy_timeout")
    assert error["type"] == "timeout"


def test_nginx_passes_the_apps_own_errors(server, proxy, http):
    """A 401 from the app, through nginx: the app's envelope, not an nginx page;
    nginx names no version (server_tokens off)."""
    response = http.get(f"{proxy.url}/api/v1/llms", timeout=10)
    assert_envelope(response, 401, "missing_token")
    assert response.headers["Server"] == "nginx"
