"""HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured: publishers behind a
strict proxy get out the way every other tool on the machine does."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from publisher_client import Publisher
from publisher_client.backends import Call, OpenAIBackend
from publisher_client.config import LlmConfig
from tests.publisher_client.helpers import API, register_reply

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY",
              "no_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_https_proxy_is_used_for_the_server(make_config, mocked, clean_proxy_env):
    clean_proxy_env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    mocked.post("https://switchboard.test/api/v1/publishers/register",
                json=register_reply(), status=201)

    Publisher(make_config(server="https://switchboard.test")).register()

    assert mocked.calls[0].request.req_kwargs["proxies"]["https"] == "http://proxy.corp:3128"


def test_no_proxy_bypasses_the_proxy(make_config, mocked, clean_proxy_env):
    clean_proxy_env.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    clean_proxy_env.setenv("NO_PROXY", "switchboard.test,127.0.0.1")
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)

    Publisher(make_config()).register()

    assert "http" not in mocked.calls[0].request.req_kwargs["proxies"]



@pytest.mark.parametrize("no_proxy, expected", [("", "http://proxy.corp:3128"),
                                                ("gpu.lan", None)])
def test_a_backend_honours_http_proxy_and_no_proxy(mocked, clean_proxy_env, no_proxy,
                                                   expected):
    clean_proxy_env.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    clean_proxy_env.setenv("NO_PROXY", no_proxy)
    mocked.post("http://gpu.lan:8000/v1/chat/completions", json={"ok": True})
    backend = OpenAIBackend(LlmConfig(name="v", type="openai", model="m",
                                      url="http://gpu.lan:8000/v1"))

    assert backend.answer({"model": "m"}, False, Call()).body == {"ok": True}

    assert mocked.calls[0].request.req_kwargs["proxies"].get("http") == expected


class RecordingProxy:
    """A forward proxy that answers Switchboard's register itself, recording
    the absolute-form request lines it receives."""

    def __init__(self):
        self.paths = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.paths.append(self.path)
                body = json.dumps(register_reply("via-proxy")).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_proxy_carries_the_traffic_to_an_otherwise_unreachable_server(
        make_config, clean_proxy_env):
    proxy = RecordingProxy()
    clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
    try:
        # switchboard.invalid does not resolve: only the proxy can reach it.
        session_id = Publisher(make_config(server="http://switchboard.invalid")).register()
    finally:
        proxy.stop()

    assert session_id == "via-proxy"
    assert proxy.paths == ["http://switchboard.invalid/api/v1/publishers/register"]
