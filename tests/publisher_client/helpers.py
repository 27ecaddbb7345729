"""Constants and small helpers of the publisher client's tests."""
import json
import time

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


class SlowStreamBackend:
    """A real OpenAI-compatible backend on a loopback port that streams
    `chunks` SSE events `interval` seconds apart and notes when the client
    hangs up (`disconnected` is set: a write failed)."""

    def __init__(self, chunks=200, interval=0.02):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
                        event = ('data: {"choices": [{"delta": {"content": "w%d "}}]}\n\n'
                                 % i).encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        backend.chunks_sent += 1
                        time.sleep(interval)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    backend.disconnected.set()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
