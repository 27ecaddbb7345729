"""Proxying to a public LLM's OpenAI-compatible upstream.

One pooled `requests` transport adapter per process; every call has a
(connect, read) timeout. Under the gevent worker its sockets are cooperative.
Calls go to the adapter, not through a `requests.Session`: a session's
per-call merging of settings, cookies and environment is most of requests'
cost, and a shared cookie jar would carry one client's upstream cookies to
another's calls.
"""
import contextvars
import logging
import select
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from jsonio import dumps, loads
from services import request_ids
from services.api_keys import ApiKeyCipher
from services.errors import BadGateway, ServiceError
from services.inference import CHAT, SSE_KEEPALIVE, Endpoint, Reply, Target

try:  # the system call itself, even when gevent has patched `select`
    from gevent.monkey import get_original
    _poll = get_original("select", "poll")
except ImportError:  # pragma: no cover - gevent is a dependency
    _poll = select.poll

log = logging.getLogger(__name__)

# requests wraps urllib3's errors on the way in; reading the raw stream raises them bare.
UPSTREAM_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
MAX_TEMPLATES = 1024


class Upstream:
    def __init__(self, connect_timeout: float, read_timeout: float, stream_idle_timeout: float,
                 *, cipher: ApiKeyCipher, keepalive: float | None = None):
        """`cipher` decrypts the targets' stored API keys. With `keepalive`, a
        stream whose upstream has not sent its first byte within that many
        seconds is answered 200 at once and kept alive with SSE comments
        every `keepalive` seconds (what a virtual LLM's stream gets too)."""
        self.cipher = cipher
        self.keepalive = keepalive
        self.timeout = (connect_timeout, read_timeout)
        # For a stream the read timeout bounds the silence between two reads.
        self.stream_timeout = (connect_timeout, stream_idle_timeout)
        self.adapter = UpstreamAdapter(pool_connections=32, pool_maxsize=64, max_retries=0)
        self._templates: dict[str, requests.PreparedRequest] = {}

    @classmethod
    def from_config(cls, config) -> "Upstream":
        return cls(float(config["UPSTREAM_CONNECT_TIMEOUT"]), float(config["INFER_TIMEOUT"]),
                   float(config["STREAM_IDLE_TIMEOUT"]), cipher=ApiKeyCipher.from_config(config),
                   keepalive=float(config["STREAM_KEEPALIVE"]))

    def forward(self, target: Target, body: dict, endpoint: Endpoint = CHAT,
                headers=None) -> Reply:
        """Send the body to the target's `{url}/{endpoint}` (with `headers`)
        and return its reply as it is.

        A streamed 200 comes back as an SSE byte stream relayed as it arrives.
        Raises BadGateway when the upstream cannot be reached or breaks first
        (or, for a stream kept alive meanwhile, ends with an error event).
        Raises ApiKeyUnreadable (the stored key does not decrypt).
        """
        request = self._request(target, dumps(body), endpoint, headers)
        if body.get("stream") is not True:
            return self._open(target, request, streaming=False)
        if self.keepalive is None:
            return self._stream_reply(target, self._open(target, request, streaming=True),
                                      endpoint)
        opening = _Opening(lambda: self._open(target, request, streaming=True))
        if opening.done.wait(self.keepalive):
            return self._stream_reply(target, opening.outcome(), endpoint)
        # The first byte is late (a model loading, a long prompt): commit to a
        # stream now, so that proxies and people see it is alive.
        return Reply(200, stream=_Abandoning(self._kept_alive(opening, target, endpoint),
                                             opening),
                     content_type="text/event-stream")

    def _open(self, target, request, streaming):
        """The upstream's answer: a Reply as it is, or for a streamed 200 the
        open (response, first bytes, the rest). Raises BadGateway."""
        response = None
        try:
            response = self.adapter.send(
                request, stream=streaming,
                timeout=self.stream_timeout if streaming else self.timeout)
            content_type = response.headers.get("Content-Type", "application/json")
            if not (streaming and response.status_code == 200
                    and content_type.startswith("text/event-stream")):
                # Errors, and an upstream that answered a stream request with
                # one JSON body, go back as they are.
                return Reply(response.status_code, response.content, content_type=content_type)
            chunks = _as_they_arrive(response.raw)
            first = next(chunks, b"")
        except UPSTREAM_ERRORS as exc:
            if response is not None:
                response.close()
            log.warning("upstream of LLM %s failed: %s", target.name, type(exc).__name__)
            raise BadGateway(f"The upstream of LLM '{target.name}' failed ({_reason(exc)})",
                             code="upstream_unreachable") from None
        return _OpenStream(response, first, chunks)

    def _stream_reply(self, target, opened, endpoint) -> Reply:
        if isinstance(opened, Reply):
            return opened
        return Reply(200, stream=self._relay(opened, target, endpoint),
                     content_type="text/event-stream")

    def _kept_alive(self, opening, target, endpoint):
        """Keep-alive comments until the upstream answers, then its stream; an
        answer that is not a stream, or a failure, becomes the last event."""
        try:
            yield SSE_KEEPALIVE
            while not opening.done.wait(self.keepalive):
                yield SSE_KEEPALIVE
            try:
                opened = opening.outcome()
            except ServiceError as exc:
                yield endpoint.failure_event(exc)
                return
            if isinstance(opened, Reply):
                yield endpoint.error_event(*_late_answer_error(target, opened))
                return
            yield from self._relay(opened, target, endpoint)
        finally:
            opening.abandon()

    def _relay(self, opened, target, endpoint):
        try:
            if opened.first:
                yield opened.first
            yield from opened.chunks
        except UPSTREAM_ERRORS as exc:
            log.warning("upstream stream of LLM %s broke: %s", target.name, type(exc).__name__)
            yield endpoint.error_event(
                502, f"The upstream stream of LLM '{target.name}' broke ({_reason(exc)})",
                "upstream_error", "upstream_stream_broken")
        finally:
            opened.close()

    def _request(self, target: Target, data: bytes, endpoint: Endpoint,
                 headers=None) -> requests.PreparedRequest:
        """The POST to the target's `{url}/{endpoint}`, with the stored key as
        the backend expects it (Anthropic's `x-api-key` on messages) and the
        request's `X-Request-Id`. The URL is parsed and checked once, into a
        template copied per call. Raises ApiKeyUnreadable (the stored key does
        not decrypt)."""
        key = (target.url, endpoint.path)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()
            template = requests.Request(
                "POST", f"{target.url.rstrip('/')}/{endpoint.path}",
                headers={"Content-Type": "application/json", "User-Agent": "switchboard"},
            ).prepare()
            self._templates[key] = template
        request = template.copy()
        request.body = data
        request.headers["Content-Length"] = str(len(data))
        if headers:
            request.headers.update(headers)
        api_key = self.cipher.decrypt(target.api_key, target.name)
        if api_key and endpoint.anthropic:
            request.headers["x-api-key"] = api_key
        elif api_key:
            request.headers["Authorization"] = f"Bearer {api_key}"
        request_id = request_ids.current()
        if request_id:
            request.headers[request_ids.HEADER] = request_id
        return request


@dataclass(slots=True)
class _OpenStream:
    response: requests.Response
    first: bytes
    chunks: Iterator[bytes]

    def close(self):
        self.response.close()


class _Opening:
    """`open()` run beside the caller (a greenlet under gevent's patched
    threading), so that the caller can send keep-alives meanwhile. Whatever
    `open()` returns after the caller gave up on it is closed."""

    def __init__(self, open_):
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._result = self._error = None
        self._abandoned = False
        # In the caller's context: its request id goes upstream and into its log lines.
        threading.Thread(target=contextvars.copy_context().run, args=(self._run, open_),
                         daemon=True, name="upstream-open").start()

    def _run(self, open_):
        try:
            self._result = open_()
        except BaseException as exc:  # handed to the caller by outcome()
            self._error = exc
        with self._lock:
            self.done.set()
            abandoned = self._abandoned
        if abandoned:
            self._close_result()

    def outcome(self):
        """What `open()` returned; raises what it raised. Only once `done`."""
        if self._error is not None:
            raise self._error
        return self._result

    def abandon(self):
        """The caller is gone, or has taken the outcome (closed with its stream)."""
        with self._lock:
            self._abandoned = True
            done = self.done.is_set()
        if done:
            self._close_result()

    def _close_result(self):
        if isinstance(self._result, _OpenStream):
            self._result.close()


class _Abandoning:
    """The kept-alive stream; closing it abandons the opening even if it was
    never iterated (a generator's `finally` would not run then)."""

    def __init__(self, stream, opening):
        self._stream = stream
        self._opening = opening

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._stream)

    def close(self):
        try:
            self._stream.close()
        finally:
            self._opening.abandon()


def _late_answer_error(target, reply: Reply) -> tuple:
    """(status, message, type, code, details) of the error event for an upstream that
    answered a kept-alive stream with something else than a stream (its
    status and message, if it gave one)."""
    try:
        detail = loads(reply.body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = None
    message = f"The upstream of LLM '{target.name}' answered {reply.status}"
    return (reply.status, f"{message}: {detail}" if detail else message, "upstream_error",
            "upstream_error_status", {"status": reply.status})


class _OneSegmentRequests:
    """urllib3 sends a request's head and its body in two writes, so the
    upstream wakes up twice and parses twice per call. Send a small body in
    the head's segment instead."""

    _hold = False
    _held = None

    def request(self, method, url, body=None, headers=None, **kwargs):
        self._hold = isinstance(body, bytes) and 0 < len(body) <= 65536
        try:
            return super().request(method, url, body=body, headers=headers, **kwargs)
        finally:
            held, self._held, self._hold = self._held, None, False
            if held is not None:  # no body write came after all
                super().send(held)

    def send(self, data):
        if self._hold:
            if self._held is None:
                self._held = data  # the head: wait for the body
                return
            data, self._held, self._hold = self._held + data, None, False
        super().send(data)


class _QuickLivenessCheck:
    """urllib3 checks a pooled connection before reusing it with a
    zero-timeout poll, which gevent's patched `select` routes through its hub
    (~14 µs instead of ~1). A zero timeout never blocks: the plain system call
    does."""

    @property
    def is_connected(self):
        if self.sock is None:
            return False
        poller = _poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)  # readable while idle: closed, or stray bytes


class _HTTPConnection(_OneSegmentRequests, _QuickLivenessCheck, HTTPConnection):
    pass


class _HTTPSConnection(_OneSegmentRequests, _QuickLivenessCheck, HTTPSConnection):
    pass


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class UpstreamAdapter(HTTPAdapter):
    """requests' pooled adapter, its connections sending each request in one write."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPConnectionPool,
                                                   "https": _HTTPSConnectionPool}


def _as_they_arrive(raw, size=65536):
    """The body's bytes as the network delivers them. (`iter_content(None)`
    would read a body without chunked framing to its end before yielding.)"""
    while data := raw.read1(size, decode_content=True):
        yield data


def _reason(exc) -> str:
    """A short, key-free description of a requests failure."""
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "unreachable"
    if isinstance(exc, urllib3.exceptions.ProtocolError | OSError):
        return "connection lost"
    return type(exc).__name__
