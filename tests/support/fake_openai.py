"""A fake OpenAI-compatible upstream on a free loopback port, for tests.

    with FakeOpenAI() as fake:
        fake.url                        # http://127.0.0.1:PORT/v1
        fake.script(status=404, body={"error": {"message": "nope"}})
        fake.script(chunks=["Hel", "lo"], chunk_delay=0.2)
        fake.script(chunks=["a", "b", "c"], break_after=1)
        fake.requests                   # [{"method", "path", "headers", "json",
                                        #   "client_port"}, ...]
                                        # (headers are case-insensitive)

Without a script, `POST /v1/chat/completions` echoes the last user message:
as one chat.completion, or (`"stream": true`) word by word as
chat.completion.chunk SSE events ending with `data: [DONE]`. The other
endpoints answer in their own shapes, streamed when asked (`event:` lines
for responses and Anthropic's messages, `[DONE]` only for completions):
`/v1/completions` echoes the prompt, `/v1/responses` the input,
`/v1/messages` the last user message, and `/v1/embeddings` gives each input
the vector `embedding_of(text)`. Each scripted reply answers exactly one
request, in order; a chunk given as (event, dict) is sent with its `event:`
line. `GET /v1/models` lists `models`.
"""
import collections
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from requests.structures import CaseInsensitiveDict


@dataclass
class ScriptedReply:
    """The next chat reply. `chunks` makes it a stream (each a string of
    delta content, or a dict sent as the whole chunk); otherwise `status` and
    `body` (a dict is sent as JSON, str/bytes as they are)."""

    status: int = 200
    body: Any = None
    chunks: list | None = None
    delay: float = 0.0                # before the status line
    chunk_delay: float | None = None  # between chunks; None: the server's default
    break_after: int | None = None    # drop the connection after this many chunks
    done: bool = True                 # end a full stream with `data: [DONE]`
    chunked: bool = True              # False: close-delimited body, no Transfer-Encoding
    headers: dict = field(default_factory=dict)


class FakeOpenAI:
    def __init__(self, models=("fake-model",), chunk_delay=0.0):
        self.models = list(models)
        self.chunk_delay = chunk_delay
        self.requests: list[dict] = []
        self._replies: collections.deque[ScriptedReply] = collections.deque()
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -----------------------------------------------------------

    def script(self, reply: ScriptedReply | None = None, **fields) -> ScriptedReply:
        """Queue the reply to the next chat request (a ScriptedReply, or its fields)."""
        reply = reply or ScriptedReply(**fields)
        with self._lock:
            self._replies.append(reply)
        return reply

    def reset(self):
        """Forget recorded requests and unused scripts (between tests sharing one fake)."""
        with self._lock:
            self._replies.clear()
            self.requests.clear()

    @property
    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def requests_to(self, endpoint: str) -> list[dict]:
        return [r for r in self.requests if r["path"].rstrip("/") == f"/v1/{endpoint}"]

    @property
    def last_request(self) -> dict:
        return self.requests[-1]

    def _record(self, entry):
        with self._lock:
            self.requests.append(entry)

    def _next_reply(self) -> ScriptedReply | None:
        with self._lock:
            return self._replies.popleft() if self._replies else None


class _Server(ThreadingHTTPServer):
    request_queue_size = 512   # many streams connect at once (the default backlog is 5)


def completion(content, model="fake-model") -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def embedding_of(text: str, dimensions: int = 4) -> list[float]:
    """A deterministic vector from the text's bytes."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255, 4) for byte in digest[:dimensions]]


def completion_chunk(content, model="fake-model", finish_reason=None) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "delta": {"content": content} if content is not None else {}}]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams
    owner: FakeOpenAI

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._record(None)
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for m in self.owner.models]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self._record(body)
        endpoint = self.path.rstrip("/").removeprefix("/v1/")
        default = DEFAULT_REPLIES.get(endpoint)
        if default is None:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        reply = self.owner._next_reply() or default(self, body or {})
        if reply.delay:
            time.sleep(reply.delay)
        if reply.chunks is not None:
            self._send_stream(reply, (body or {}).get("model", "fake-model"))
        elif isinstance(reply.body, (str, bytes)):
            data = reply.body.encode() if isinstance(reply.body, str) else reply.body
            self._send(reply.status, data, reply.headers.get("Content-Type", "text/plain"),
                       reply.headers)
        else:
            self._send_json(reply.status, reply.body, reply.headers)

    # -- replies -------------------------------------------------------------

    def _default_reply(self, body) -> ScriptedReply:
        messages = body.get("messages") or []
        last_user = next((m.get("content") for m in reversed(messages)
                          if isinstance(m, dict) and m.get("role") == "user"), "")
        text = last_user if isinstance(last_user, str) and last_user else "Hello!"
        if body.get("stream") is True:
            words = text.split(" ")
            return ScriptedReply(chunks=[w if i == 0 else " " + w for i, w in enumerate(words)])
        return ScriptedReply(body=completion(text, body.get("model", "fake-model")))

    def _send_stream(self, reply, model):
        delay = self.owner.chunk_delay if reply.chunk_delay is None else reply.chunk_delay
        payloads = [_sse(c) if isinstance(c, dict | tuple) else _sse(completion_chunk(c, model))
                    for c in reply.chunks]
        if reply.done:
            payloads.append(b"data: [DONE]\n\n")
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        try:
            for i, payload in enumerate(payloads):
                if reply.break_after is not None and i >= reply.break_after:
                    self._drop_connection()
                    return
                if i and delay:
                    time.sleep(delay)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload)
                                 if reply.chunked else payload)
                self.wfile.flush()
            if reply.chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        if not reply.chunked:
            self.close_connection = True

    def _drop_connection(self):
        """End the stream without its terminator, as a crashing upstream does."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_json(self, status, obj, headers=None):
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            if name.lower() != "content-type":
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body):
        self.owner._record({"method": self.command, "path": self.path,
                            "client_port": self.client_address[1],
                            "headers": CaseInsensitiveDict(self.headers.items()), "json": body})


def _sse(chunk) -> bytes:
    """`data: {...}`, after `event: <name>` for an (event, dict) chunk."""
    if isinstance(chunk, tuple):
        event, data = chunk
        return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _words(text: str) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]


def _text_of(value) -> str:
    """The text of a prompt or an input: a string, or the strings in a list."""
    if isinstance(value, str):
        return value or "Hello!"
    if isinstance(value, list):
        texts = [_text_of(v.get("content")) if isinstance(v, dict) else _text_of(v)
                 for v in value]
        return texts[-1] if texts else "Hello!"
    return "Hello!"


def _completion_reply(handler, body) -> ScriptedReply:
    text, model = _text_of(body.get("prompt")), body.get("model", "fake-model")
    def choice(text, finish=None):
        return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish}]}
    if body.get("stream") is True:
        return ScriptedReply(chunks=[choice(w) for w in _words(text)] + [choice("", "stop")])
    return ScriptedReply(body={**choice(text, "stop"), "usage": {
        "prompt_tokens": 1, "completion_tokens": len(text.split()),
        "total_tokens": 1 + len(text.split())}})


def _embedding_reply(handler, body) -> ScriptedReply:
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    texts = [i if isinstance(i, str) else " ".join(map(str, i)) for i in inputs]
    return ScriptedReply(body={
        "object": "list", "model": body.get("model", "fake-model"),
        "data": [{"object": "embedding", "index": n, "embedding": embedding_of(t)}
                 for n, t in enumerate(texts)],
        "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})


def _response_object(model, text, status="completed") -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text else []
    return {"id": "resp_fake", "object": "response", "created_at": 1700000000, "model": model,
            "status": status, "output": [{"type": "message", "id": "msg_fake", "role": "assistant",
                                          "status": status, "content": content}],
            "usage": {"input_tokens": 1, "output_tokens": len(text.split()),
                      "total_tokens": 1 + len(text.split())} if text else None}


def _responses_reply(handler, body) -> ScriptedReply:
    text, model = _text_of(body.get("input")), body.get("model", "fake-model")
    if body.get("stream") is not True:
        return ScriptedReply(body=_response_object(model, text))
    events = [("response.created", {"type": "response.created", "sequence_number": 0,
                                    "response": _response_object(model, "", "in_progress")})]
    for word in _words(text):
        events.append(("response.output_text.delta", {
            "type": "response.output_text.delta", "item_id": "msg_fake", "output_index": 0,
            "content_index": 0, "delta": word, "sequence_number": len(events)}))
    events.append(("response.completed", {"type": "response.completed",
                                          "sequence_number": len(events),
                                          "response": _response_object(model, text)}))
    return ScriptedReply(chunks=events, done=False)


def _messages_reply(handler, body) -> ScriptedReply:
    """Anthropic's messages: the last user message back."""
    messages = body.get("messages") or []
    last = next((m.get("content") for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    text = last if isinstance(last, str) and last else _text_of(
        [b.get("text") for b in last if isinstance(b, dict)] if isinstance(last, list) else "")
    model = body.get("model", "fake-model")
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 1,
                                                "output_tokens": len(text.split())}}
    if body.get("stream") is not True:
        return ScriptedReply(body=message)
    events = [("message_start", {"type": "message_start", "message": {
                  **message, "content": [], "stop_reason": None,
                  "usage": {"input_tokens": 1, "output_tokens": 0}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": word}})
               for word in _words(text)]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": len(text.split())}}),
               ("message_stop", {"type": "message_stop"})]
    return ScriptedReply(chunks=events, done=False)


DEFAULT_REPLIES = {"chat/completions": _Handler._default_reply,
                   "completions": _completion_reply, "embeddings": _embedding_reply,
                   "responses": _responses_reply, "messages": _messages_reply}
