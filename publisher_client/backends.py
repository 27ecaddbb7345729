"""Local LLM backends: any OpenAI-compatible server, and a built-in echo.

A backend answers a body for one of the endpoints (`chat/completions`,
`completions`, `embeddings`, `responses`, `messages`: it is POSTed to
`{url}/{endpoint}`) with an Answer: either a status and body (non-streaming,
or a streaming request the backend refused), or an iterator of SSE payloads
(JSON strings, an `Event` where the stream names its events, then maybe
"[DONE]"). Every request runs under a Call, which another thread may abort
at any moment: the socket is shut down, so a blocked connect, send or read
returns at once and the backend sees the client go away.
"""
import hashlib
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from publisher_client.bodies import BodyReader, Event, SseParser
from publisher_client.config import LlmConfig
from publisher_client.environment import read_environment_once
from publisher_client.errors import BackendUnavailable

log = logging.getLogger(__name__)

DONE = "[DONE]"
DEFAULT_ENDPOINT = "chat/completions"
ANTHROPIC_VERSION = "2023-06-01"


CONNECT_TIMEOUT = 5.0
INFER_READ_TIMEOUT = 600.0      # the server's INFER_TIMEOUT
STREAM_READ_TIMEOUT = 120.0     # the server's STREAM_IDLE_TIMEOUT, between two reads
PROBE_TIMEOUT = (3.0, 5.0)


class Aborted(Exception):
    """The call was aborted (client gone, task cancelled)."""


class Call:
    """One backend request that another thread may abort.

    The request's connection hands its socket over as soon as it connects
    (see _CallConnection), so abort() works before the backend has sent a
    byte: vLLM and llama.cpp send a plain answer's headers only when it is
    finished, Ollama a stream's only once the model is loaded."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sock = None
        self.aborted = threading.Event()

    def hold(self, sock):
        """Keep `sock` for abort(); shut it down at once if that already happened."""
        with self._lock:
            if not self.aborted.is_set():
                self._sock = sock
                return
        _shut_down(sock)

    def abort(self):
        with self._lock:
            self.aborted.set()
            sock, self._sock = self._sock, None
        if sock is not None:
            _shut_down(sock)

    def release(self):
        """The request is over: a late abort() must not shut down a socket
        the pool may already have handed to another request."""
        with self._lock:
            self._sock = None

    def check(self):
        if self.aborted.is_set():
            raise Aborted()


def _shut_down(sock):
    """Wake the thread blocked on `sock`; the backend sees the connection go."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed: the request is over
        pass


# The Call whose request runs on this thread, for the connection to find.
_running = threading.local()


@contextlib.contextmanager
def _running_under(call: Call):
    _running.call = call
    try:
        yield
    finally:
        _running.call = None


class _HandsSocketToCall:
    def connect(self):
        super().connect()
        call = getattr(_running, "call", None)
        if call is not None:
            call.hold(self.sock)


class _CallConnection(_HandsSocketToCall, HTTPConnection):
    pass


class _CallHTTPSConnection(_HandsSocketToCall, HTTPSConnection):
    pass


class _CallPool(HTTPConnectionPool):
    ConnectionCls = _CallConnection


class _CallHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CallHTTPSConnection


_CALL_POOLS = {"http": _CallPool, "https": _CallHTTPSPool}


class _CallAdapter(HTTPAdapter):
    """Connections whose socket goes to the Call running on their thread.
    (Through a SOCKS proxy they do not: an abort then waits for the headers.)"""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _CALL_POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _CALL_POOLS
        return manager


# Reads every streamed body that it can (bodies.py), for all the LLMs.
BODY_READER = BodyReader()


@dataclass
class Answer:
    """A backend's answer: a status and body, or a stream the backend
    accepted: either `chunks` to iterate on the task's thread, or `pump`:
    `pump(stream)` has the body reader relay it into `stream` (a
    streaming.Stream), returning at its end."""
    status: int
    body: Any = None
    chunks: Iterator[str] | None = None
    pump: Callable[[Any], None] | None = None

    @property
    def streamed(self) -> bool:
        return self.chunks is not None or self.pump is not None


class OpenAIBackend:
    """Any OpenAI-compatible server: vLLM, llama.cpp server, Ollama, LM Studio."""

    def __init__(self, llm: LlmConfig):
        self.url = llm.url
        self.http = requests.Session()
        adapter = _CallAdapter(pool_maxsize=max(10, llm.max_concurrency + 2))
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        # A connection is never reused, so a late abort() cannot cut the next
        # request's; one connect per answer is nothing next to generating it.
        self.http.headers["Connection"] = "close"
        self.api_key = llm.api_key
        if llm.api_key:
            self.http.headers["Authorization"] = f"Bearer {llm.api_key}"
        read_environment_once(self.http, self.url)  # NO_PROXY applies to backends too

    def available(self) -> bool:
        """The backend answers GET {url}/models with a 2xx."""
        try:
            response = self.http.get(f"{self.url}/models", timeout=PROBE_TIMEOUT)
        except requests.RequestException:
            return False
        response.close()
        return 200 <= response.status_code < 300

    def answer(self, body: dict, stream: bool, call: Call,
               endpoint: str = DEFAULT_ENDPOINT) -> Answer:
        """POST {url}/{endpoint}. Raises BackendUnavailable when the backend
        cannot be reached or breaks off, Aborted when `call` is aborted."""
        read_timeout = STREAM_READ_TIMEOUT if stream else INFER_READ_TIMEOUT
        headers = None
        if endpoint == "messages":  # Anthropic's way, beside the bearer token
            headers = {"anthropic-version": ANTHROPIC_VERSION,
                       **({"x-api-key": self.api_key} if self.api_key else {})}
        try:
            with _running_under(call):
                response = self.http.post(f"{self.url}/{endpoint}", json=body, headers=headers,
                                          stream=True, timeout=(CONNECT_TIMEOUT, read_timeout))
        except requests.RequestException as exc:  # an abort shows up here too
            call.check()
            raise self._failure("unreachable", exc) from None
        if call.aborted.is_set():
            response.close()
            call.release()
            raise Aborted()
        if stream and 200 <= response.status_code < 300:
            pump = self._pump(response, call)
            if pump is not None:
                return Answer(response.status_code, pump=pump)
            return Answer(response.status_code, chunks=self._sse_payloads(response, call))
        try:
            content = response.content
        except Exception as exc:  # an abort shows up here as a read error
            call.check()
            raise self._failure("failed mid-answer", exc) from None
        finally:
            response.close()
            call.release()
        call.check()
        return Answer(response.status_code, _json_or_text(content))

    def _pump(self, response, call):
        """A pump for the body reader, when the body comes on a plain TCP
        socket and unencoded (the rest is read on the task's thread)."""
        raw = response.raw
        message = getattr(raw, "_fp", None)   # http.client's: the framing, bytes read ahead
        # The connection's socket; once a response says it closes the
        # connection, http.client leaves the socket to the response's file alone.
        sock = (getattr(getattr(raw, "connection", None), "sock", None)
                or getattr(getattr(getattr(message, "fp", None), "raw", None), "_sock", None))
        if (not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket)
                or not hasattr(message, "chunked") or not hasattr(message, "fp")
                or response.headers.get("Content-Encoding", "identity").lower() != "identity"):
            return None
        framing = ("chunked" if message.chunked
                   else "length" if message.length is not None else "close")

        def pump(stream):
            try:
                sock.setblocking(False)
                ahead = message.fp.peek() if message.fp is not None else b""  # never blocks now
                if ahead:
                    message.fp.read(len(ahead))
                BODY_READER.read(sock, framing, message.length, call, stream,
                                 STREAM_READ_TIMEOUT, self._failure, ahead)
            finally:
                response.close()
                call.release()
        return pump

    def _sse_payloads(self, response, call) -> Iterator[str]:
        """The `data:` payloads of the backend's event stream, as they arrive
        (an Event for one that came with an `event:` line), read on the
        caller's thread (read1 returns what the socket has instead of waiting
        for a full buffer; decode_content undoes a backend's gzip)."""
        try:
            parser = SseParser()
            while data := response.raw.read1(65536, decode_content=True):
                yield from parser.feed(data)
                call.check()
            call.check()  # an abort ends the read as a clean EOF: not the end of the answer
            yield from parser.end()
        except Aborted:
            raise
        except Exception as exc:  # an abort shows up here as a read error
            call.check()
            raise self._failure("stream broke", exc) from None
        finally:
            response.close()
            call.release()

    def _failure(self, what: str, exc: Exception) -> BackendUnavailable:
        """A short error for the server (it reaches clients); the URL and the
        cause stay in the local log."""
        what = "timed out" if _timed_out(exc) else what
        return BackendUnavailable(f"backend {what}", f"backend {self.url} {what}: {exc}")


def _timed_out(exc: BaseException | None) -> bool:
    """Whether a timeout is anywhere in the chain requests and urllib3 wrap it in."""
    for _ in range(10):
        # urllib3 2 derives NewConnectionError (refused, unreachable) from
        # ConnectTimeoutError for old callers; it is no timeout.
        if exc is None or isinstance(exc, urllib3.exceptions.NewConnectionError):
            return False
        if isinstance(exc, (TimeoutError, requests.Timeout, urllib3.exceptions.TimeoutError)):
            return True
        inner = (exc.args[0] if exc.args else None, getattr(exc, "reason", None),
                 exc.__cause__, exc.__context__)
        exc = next((e for e in inner if isinstance(e, BaseException)), None)
    return False


def _json_or_text(content: bytes):
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")


class EchoBackend:
    """A test backend that answers every endpoint with the caller's own text:
    chat, completions, responses and messages with the last user message (or
    the prompt, the input), streamed word by word; embeddings with a
    deterministic vector from each input's bytes."""

    DIMENSIONS = 8

    def __init__(self, llm: LlmConfig):
        self.model = llm.model

    def available(self) -> bool:
        return True

    def answer(self, body: dict, stream: bool, call: Call,
               endpoint: str = DEFAULT_ENDPOINT) -> Answer:
        model = body.get("model") or self.model
        if endpoint == "embeddings":
            return Answer(200, self._embeddings(body.get("input"), model))
        text = _echoed_text(endpoint, body)
        shape = _ECHO_SHAPES[endpoint]
        if stream:
            return Answer(200, chunks=_checked(shape.chunks(text, model), call))
        return Answer(200, shape.whole(text, model))

    def _embeddings(self, inputs, model) -> dict:
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        texts = [i if isinstance(i, str) else json.dumps(i) for i in inputs]
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": n, "embedding": embedding_of(t)}
                         for n, t in enumerate(texts)],
                "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                          "total_tokens": sum(len(t.split()) for t in texts)}}


def embedding_of(text: str, dimensions: int = EchoBackend.DIMENSIONS) -> list[float]:
    """The echo backend's vector for `text`: from the SHA-256 of its bytes."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255, 4) for byte in digest[:dimensions]]


def _checked(chunks, call) -> Iterator[str]:
    for chunk in chunks:
        call.check()
        yield chunk


def _echoed_text(endpoint: str, body: dict) -> str:
    if endpoint == "completions":
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else " ".join(
            p for p in prompt or () if isinstance(p, str))
    if endpoint == "responses":
        given = body.get("input")
        return given if isinstance(given, str) else _last_user_text(given or [])
    return _last_user_text(body.get("messages") or [])


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [word if i == len(words) - 1 else word + " " for i, word in enumerate(words)]


def _usage(text: str) -> dict:
    words = len(text.split())
    return {"prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words}


class _ChatShape:
    @staticmethod
    def whole(text, model):
        return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
                "model": model, "usage": _usage(text),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}]}

    @staticmethod
    def chunks(text, model):
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta, finish_reason=None):
            return json.dumps({
                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            })

        yield chunk({"role": "assistant", "content": ""})
        for word in _words(text):
            yield chunk({"content": word})
        yield chunk({}, "stop")
        yield DONE


class _CompletionShape:
    @staticmethod
    def whole(text, model):
        return {"id": _completion_id(), "object": "text_completion", "created": int(time.time()),
                "model": model, "usage": _usage(text),
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "stop"}]}

    @staticmethod
    def chunks(text, model):
        completion_id, created = _completion_id(), int(time.time())
        for word, finish in [(w, None) for w in _words(text)] + [("", "stop")]:
            yield json.dumps({"id": completion_id, "object": "text_completion",
                              "created": created, "model": model,
                              "choices": [{"index": 0, "text": word, "logprobs": None,
                                           "finish_reason": finish}]})
        yield DONE


class _ResponseShape:
    @staticmethod
    def whole(text, model, status="completed"):
        words = len(text.split())
        return {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
                "created_at": int(time.time()), "model": model, "status": status,
                "output": [{"type": "message", "id": "msg_echo", "role": "assistant",
                            "status": status,
                            "content": [{"type": "output_text", "text": text,
                                         "annotations": []}] if text else []}],
                "usage": {"input_tokens": words, "output_tokens": words,
                          "total_tokens": 2 * words}}

    @staticmethod
    def chunks(text, model):
        def event(kind, number, **fields):
            return Event(json.dumps({"type": kind, "sequence_number": number, **fields}), kind)

        yield event("response.created", 0,
                    response=_ResponseShape.whole("", model, status="in_progress"))
        words = _words(text)
        for n, word in enumerate(words, 1):
            yield event("response.output_text.delta", n, item_id="msg_echo", output_index=0,
                        content_index=0, delta=word)
        yield event("response.completed", len(words) + 1,
                    response=_ResponseShape.whole(text, model))


class _MessageShape:
    """Anthropic's messages."""

    @staticmethod
    def whole(text, model):
        words = len(text.split())
        return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                "model": model, "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": words, "output_tokens": words}}

    @staticmethod
    def chunks(text, model):
        def event(kind, **fields):
            return Event(json.dumps({"type": kind, **fields}), kind)

        start = {**_MessageShape.whole("", model), "content": [], "stop_reason": None}
        yield event("message_start", message=start)
        yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        for word in _words(text):
            yield event("content_block_delta", index=0,
                        delta={"type": "text_delta", "text": word})
        yield event("content_block_stop", index=0)
        yield event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                    usage={"output_tokens": len(text.split())})
        yield event("message_stop")


_ECHO_SHAPES = {"chat/completions": _ChatShape, "completions": _CompletionShape,
                "responses": _ResponseShape, "messages": _MessageShape}


def _last_user_text(messages) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                return "".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type") in ("text", "input_text"))
            return content if isinstance(content, str) else ""
    return ""


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


BACKENDS = {"openai": OpenAIBackend, "echo": EchoBackend}


def create_backend(llm: LlmConfig):
    return BACKENDS[llm.type](llm)
