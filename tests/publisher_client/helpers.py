"""Constants and small helpers of the publisher client's tests."""
import json
import socket
import threading
import time

import responses

SERVER = "http://switchboard.test"
API = f"{SERVER}/api/v1"
BACKEND = "http://backend.test/v1"


def register_reply(session_id="sess-1", *names, status="active"):
    return {"session_id": session_id,
            "llms": [{"name": name, "status": status} for name in names or ("vllm-local",)],
            "agents": []}


def sent_json(call) -> dict:
    return json.loads(call.request.body)


def calls_to(mocked, method, url_part) -> list:
    return [c for c in mocked.calls
            if c.request.method == method and url_part in c.request.url]


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class LoopbackServer:
    """A threaded HTTP server on a free loopback port, for the fakes below."""

    def serve(self, handler) -> str:
        from http.server import ThreadingHTTPServer
        import threading

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class SlowStreamBackend(LoopbackServer):
    """A real OpenAI-compatible backend on a loopback port that streams
    `chunks` SSE events `interval` seconds apart and notes when the client
    hangs up (`disconnected` is set: a write failed). Each chunk's content is
    `w<n> `, padded with `padding` characters."""

    def __init__(self, chunks=200, interval=0.02, padding=0):
        import threading
        from http.server import BaseHTTPRequestHandler

        self.chunks_sent = 0
        self.disconnected = threading.Event()
        self.requests = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                body = b'{"data": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                backend.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(chunks):
                        event = ('data: {"choices": [{"delta": {"content": "w%d %s"}}]}\n\n'
                                 % (i, "x" * padding)).encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        backend.chunks_sent += 1
                        time.sleep(interval)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    backend.disconnected.set()
                self.close_connection = True

        self.url = self.serve(Handler) + "/v1"


class FixedAnswerBackend(LoopbackServer):
    """A real backend on a loopback port that answers every POST with `body`
    and `headers` (for what `responses` does not fake: its raw responses
    decode gzip on their own, requests' real ones do not)."""

    def __init__(self, body: bytes, headers: dict):
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.url = self.serve(Handler) + "/v1"


class LateHeadersBackend(LoopbackServer):
    """A real backend on a loopback port that sends nothing, not even headers,
    for `delay` seconds after a request (vLLM on a plain answer, Ollama
    loading a model), then a completion. `received` is set when a request
    arrives, `disconnected` when the client hangs up before the answer."""

    def __init__(self, delay=5.0):
        import select
        import threading
        from http.server import BaseHTTPRequestHandler

        self.received = threading.Event()
        self.disconnected = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                backend.received.set()
                readable, _, _ = select.select([self.connection], [], [], delay)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    backend.disconnected.set()   # EOF: the client went away
                    self.close_connection = True
                    return
                body = b'{"object": "chat.completion", "choices": []}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.url = self.serve(Handler) + "/v1"


class FakeSwitchboard(LoopbackServer):
    """Just enough of the server's publisher protocol on a loopback port for
    the real publisher process: register, heartbeat, empty polls, and a
    DELETE that takes `delete_seconds` (`delete_started` is set when it comes)."""

    def __init__(self, delete_seconds=0.0):
        import threading
        from http.server import BaseHTTPRequestHandler

        self.delete_started = threading.Event()
        self.tokens = {"publisher": "tok-fake"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/register"):
                    self.reply(201, register_reply("sess-1", "echo"))
                else:
                    self.reply(200, {"ok": True})

            def do_GET(self):
                time.sleep(0.1)
                self.reply(200, {"tasks": []})

            def do_DELETE(self):
                fake.delete_started.set()
                time.sleep(delete_seconds)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        fake = self
        self.url = self.serve(Handler)


class PublisherProcess:
    """The real `python -m publisher_client run` against a LiveServer."""

    def __init__(self, server, tmp_path, llms, agents=(), name="publisher", **settings):
        import os
        import sys
        from pathlib import Path

        self.repo_root = Path(__file__).resolve().parents[2]
        self.config_path = tmp_path / f"{name}.yaml"
        self.log_path = tmp_path / f"{name}.log"
        self.session_file = tmp_path / name / "session.json"
        config = {"server": server.url, "token_env": "SWITCHBOARD_TOKEN",
                  "session_file": str(self.session_file), "llms": list(llms),
                  "agents": list(agents), **settings}
        self.config_path.write_text(json.dumps(config, indent=2))
        self.env = {**os.environ, "SWITCHBOARD_TOKEN": server.tokens["publisher"],
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                    "PYTHONUNBUFFERED": "1"}
        self.argv = [sys.executable, "-m", "publisher_client", "run",
                     "--config", str(self.config_path), "--log-level", "INFO"]
        self.process = None
        self._log = None

    def start(self, wait=True):
        import subprocess

        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, cwd=self.repo_root, env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_for_log("registered session", count=self.log_text().count(
                "registered session") + 1)
        return self

    def wait_for_log(self, text, count=1, timeout=15.0):
        def seen():
            if self.process.poll() is not None:
                raise AssertionError(f"publisher exited ({self.process.returncode}):\n"
                                     f"{self.log_text()}")
            return self.log_text().count(text) >= count
        try:
            wait_for(seen, timeout, f"{text!r} in the publisher log")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_text()}") from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout=15.0) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self):
        self.process.kill()
        self.process.wait(10)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.kill()
        if self._log is not None:
            self._log.close()


def expect_result(mocked, task_id="t1"):
    """Register the result endpoint; returns what `wait(timeout)`s until it was
    called and its call recorded (`responses` records a call only after its
    callback returns: reading mocked.calls on the callback's word alone races)."""
    url = f"{API}/tasks/{task_id}/result"
    called = threading.Event()

    def result(request):
        called.set()
        return 200, {}, json.dumps({"accepted": True})
    mocked.add_callback(responses.POST, url, callback=result)

    class Posted:
        @staticmethod
        def wait(timeout):
            def recorded():
                return any(c.request.url == url and getattr(c.response, "status_code", None)
                           == 200 for c in list(mocked.calls))
            if not called.wait(timeout):
                return False
            wait_for(recorded, timeout, what=f"the call to {url} to be recorded")
            return True
    return Posted()
