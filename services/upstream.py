"""Proxying to a public LLM's OpenAI-compatible upstream.

One pooled `requests` transport adapter per process; every call has a
(connect, read) timeout. Under the gevent worker its sockets are cooperative.
Calls go to the adapter, not through a `requests.Session`: a session's
per-call merging of settings, cookies and environment is most of requests'
cost, and a shared cookie jar would carry one client's upstream cookies to
another's calls.
"""
import logging
import select

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from jsonio import dumps
from services.api_keys import ApiKeyCipher
from services.errors import BadGateway, envelope
from services.inference import Reply, Target

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
                 *, cipher: ApiKeyCipher):
        """`cipher` decrypts the targets' stored API keys."""
        self.cipher = cipher
        self.timeout = (connect_timeout, read_timeout)
        # For a stream the read timeout bounds the silence between two reads.
        self.stream_timeout = (connect_timeout, stream_idle_timeout)
        self.adapter = UpstreamAdapter(pool_connections=32, pool_maxsize=64, max_retries=0)
        self._templates: dict[str, requests.PreparedRequest] = {}

    @classmethod
    def from_config(cls, config) -> "Upstream":
        return cls(float(config["UPSTREAM_CONNECT_TIMEOUT"]), float(config["INFER_TIMEOUT"]),
                   float(config["STREAM_IDLE_TIMEOUT"]), cipher=ApiKeyCipher.from_config(config))

    def forward(self, target: Target, body: dict) -> Reply:
        """Send the chat-completions body upstream and return its reply as it is.

        A streamed 200 comes back as an SSE byte stream relayed as it arrives.
        Raises BadGateway when the upstream cannot be reached or breaks first.
        """
        streaming = body.get("stream") is True
        response = None
        try:
            response = self.adapter.send(
                self._request(target, dumps(body)), stream=streaming,
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
        return Reply(200, stream=self._relay(response, first, chunks, target),
                     content_type="text/event-stream")

    def _relay(self, response, first, chunks, target):
        try:
            if first:
                yield first
            yield from chunks
        except UPSTREAM_ERRORS as exc:
            log.warning("upstream stream of LLM %s broke: %s", target.name, type(exc).__name__)
            message = f"The upstream stream of LLM '{target.name}' broke ({_reason(exc)})"
            yield b"data: " + dumps(envelope(message, "upstream_error",
                                             "upstream_stream_broken")) + b"\n\n"
        finally:
            response.close()

    def _request(self, target: Target, data: bytes) -> requests.PreparedRequest:
        """The POST to the target's `/chat/completions`. Its URL is parsed and
        checked once, into a template copied per call."""
        template = self._templates.get(target.url)
        if template is None:
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()
            template = requests.Request(
                "POST", target.url.rstrip("/") + "/chat/completions",
                headers={"Content-Type": "application/json", "User-Agent": "switchboard"},
            ).prepare()
            self._templates[target.url] = template
        request = template.copy()
        request.body = data
        request.headers["Content-Length"] = str(len(data))
        api_key = self.cipher.decrypt(target.api_key, target.name)
        if api_key:
            request.headers["Authorization"] = f"Bearer {api_key}"
        return request


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
