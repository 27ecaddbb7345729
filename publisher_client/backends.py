"""Local LLM backends: any OpenAI-compatible server, and a built-in echo.

A backend answers a chat-completions body with an Answer: either a status
and body (non-streaming, or a streaming request the backend refused), or an
iterator of SSE payloads (chat.completion.chunk JSON strings, then
"[DONE]"). Every request runs under a Call, which another thread may abort
at any moment: the socket is shut down, so a blocked read returns at once
and the backend sees the client go away.
"""
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import requests
from requests.adapters import HTTPAdapter

from publisher_client.config import LlmConfig
from publisher_client.errors import BackendUnavailable

DONE = "[DONE]"
CONNECT_TIMEOUT = 5.0
INFER_READ_TIMEOUT = 600.0      # the server's INFER_TIMEOUT
STREAM_READ_TIMEOUT = 120.0     # the server's STREAM_IDLE_TIMEOUT, between two reads
PROBE_TIMEOUT = (3.0, 5.0)


class Aborted(Exception):
    """The call was aborted (client gone, task cancelled)."""


class Call:
    """One backend request that another thread may abort."""

    def __init__(self):
        self._lock = threading.Lock()
        self._response = None
        self.aborted = threading.Event()

    def attach(self, response):
        """Hold `response` so abort() can close it. Raises Aborted (and
        closes it) when the call was aborted meanwhile."""
        with self._lock:
            if not self.aborted.is_set():
                self._response = response
                return
        response.close()
        raise Aborted()

    def abort(self):
        with self._lock:
            self.aborted.set()
            response, self._response = self._response, None
        if response is not None:
            _interrupt(response)

    def check(self):
        if self.aborted.is_set():
            raise Aborted()


def _interrupt(response):
    """Wake the thread reading `response`; it closes the response, and the
    backend sees the connection go."""
    try:
        response.raw.shutdown()
    except Exception:  # nobody is reading (released or not started): just close
        response.close()


@dataclass
class Answer:
    status: int
    body: Any = None
    chunks: Iterator[str] | None = None   # set for a stream the backend accepted


class OpenAIBackend:
    """Any OpenAI-compatible server: vLLM, llama.cpp server, Ollama, LM Studio."""

    def __init__(self, llm: LlmConfig):
        self.url = llm.url
        self.http = requests.Session()   # trust_env: NO_PROXY applies to backends too
        adapter = HTTPAdapter(pool_maxsize=max(10, llm.max_concurrency + 2))
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        if llm.api_key:
            self.http.headers["Authorization"] = f"Bearer {llm.api_key}"

    def available(self) -> bool:
        """The backend answers GET {url}/models with a 2xx."""
        try:
            response = self.http.get(f"{self.url}/models", timeout=PROBE_TIMEOUT)
        except requests.RequestException:
            return False
        response.close()
        return 200 <= response.status_code < 300

    def answer(self, body: dict, stream: bool, call: Call) -> Answer:
        """POST {url}/chat/completions. Raises BackendUnavailable when the
        backend cannot be reached, Aborted when `call` is aborted."""
        read_timeout = STREAM_READ_TIMEOUT if stream else INFER_READ_TIMEOUT
        try:
            # stream=True even for a plain answer: the open response is what
            # abort() closes to stop the backend's work.
            response = self.http.post(f"{self.url}/chat/completions", json=body, stream=True,
                                      timeout=(CONNECT_TIMEOUT, read_timeout))
        except requests.RequestException as exc:
            call.check()
            raise BackendUnavailable(f"backend {self.url} unreachable: {exc}") from None
        call.attach(response)
        if stream and 200 <= response.status_code < 300:
            return Answer(response.status_code, chunks=self._sse_payloads(response, call))
        try:
            content = response.content
        except Exception as exc:  # an abort shows up here as a read error
            call.check()
            raise BackendUnavailable(f"backend {self.url} failed mid-answer: {exc}") from None
        finally:
            response.close()
        call.check()
        return Answer(response.status_code, _json_or_text(content))

    def _sse_payloads(self, response, call) -> Iterator[str]:
        """The `data:` payloads of the backend's event stream, as they arrive."""
        try:
            data_lines: list[str] = []
            for line in _lines(response.raw, call):
                if line == "":
                    if data_lines:
                        yield "\n".join(data_lines)
                        data_lines = []
                elif line.startswith("data:"):
                    value = line[5:]
                    data_lines.append(value[1:] if value.startswith(" ") else value)
                # `event:`, `id:`, `retry:` and `:` comments carry nothing we relay
            call.check()  # an abort ends the read as a clean EOF: not the end of the answer
            if data_lines:
                yield "\n".join(data_lines)
        except Aborted:
            raise
        except Exception as exc:  # an abort shows up here as a read error
            call.check()
            raise BackendUnavailable(f"backend {self.url} stream broke: {exc}") from None
        finally:
            response.close()


def _lines(raw, call) -> Iterator[str]:
    """Lines of a streamed body, each yielded as soon as its newline arrives
    (read1 returns what the socket has instead of waiting for a full buffer)."""
    buffer = b""
    while True:
        data = raw.read1(65536)
        if not data:
            break
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
        call.check()
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", "replace")


def _json_or_text(content: bytes):
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")


class EchoBackend:
    """A test backend: answers with the last user message, streamed word by word."""

    def __init__(self, llm: LlmConfig):
        self.model = llm.model

    def available(self) -> bool:
        return True

    def answer(self, body: dict, stream: bool, call: Call) -> Answer:
        text = _last_user_text(body.get("messages") or [])
        model = body.get("model") or self.model
        if stream:
            return Answer(200, chunks=self._chunks(text, model, call))
        words = len(text.split())
        return Answer(200, {
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": words, "completion_tokens": words,
                      "total_tokens": 2 * words},
        })

    def _chunks(self, text, model, call) -> Iterator[str]:
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta, finish_reason=None):
            return json.dumps({
                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            })

        yield chunk({"role": "assistant", "content": ""})
        words = text.split(" ")
        for i, word in enumerate(words):
            call.check()
            yield chunk({"content": word if i == len(words) - 1 else word + " "})
        yield chunk({}, "stop")
        yield DONE


def _last_user_text(messages) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                return "".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type") == "text")
            return content if isinstance(content, str) else ""
    return ""


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


BACKENDS = {"openai": OpenAIBackend, "echo": EchoBackend}


def create_backend(llm: LlmConfig):
    return BACKENDS[llm.type](llm)
