"""A tiny OpenAI-compatible backend that is "asleep" until started, for the
wake-recipe end-to-end test.

    python sleepy_backend.py serve PORT           # serve (echoes the last user message)
    python sleepy_backend.py start PORT PIDFILE   # the wake recipe: start `serve`
                                                  # in the background, write its pid, exit 0
"""
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_json({"object": "list", "data": [{"id": "sleepy", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        text = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        self.send_json({"object": "chat.completion", "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": f"awake: {text}"}}]})

    def send_json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv):
    if argv[0] == "serve":
        ThreadingHTTPServer(("127.0.0.1", int(argv[1])), Handler).serve_forever()
    elif argv[0] == "start":
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", argv[1]],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        with open(argv[2], "w") as f:
            f.write(str(process.pid))


if __name__ == "__main__":
    main(sys.argv[1:])
