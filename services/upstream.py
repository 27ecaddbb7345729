"""Proxying to a public LLM's OpenAI-compatible upstream.

One pooled `requests` session per process; every call has a (connect, read)
timeout. Under the gevent worker its sockets are cooperative.
"""
import logging

import requests
from requests.adapters import HTTPAdapter

from jsonio import dumps
from services.errors import BadGateway, envelope
from services.inference import Reply, Target

log = logging.getLogger(__name__)


class Upstream:
    def __init__(self, connect_timeout: float, read_timeout: float, stream_idle_timeout: float):
        self.timeout = (connect_timeout, read_timeout)
        # For a stream the read timeout bounds the silence between two reads.
        self.stream_timeout = (connect_timeout, stream_idle_timeout)
        self.http = requests.Session()
        self.http.trust_env = False  # upstream URLs are the operator's, not the proxy env's
        adapter = HTTPAdapter(pool_connections=32, pool_maxsize=64, max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)

    def forward(self, target: Target, body: dict) -> Reply:
        """Send the chat-completions body upstream and return its reply as it is.

        A streamed 200 comes back as an SSE byte stream relayed as it arrives.
        Raises BadGateway when the upstream cannot be reached or breaks first.
        """
        streaming = body.get("stream") is True
        headers = {"Content-Type": "application/json"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        url = target.url.rstrip("/") + "/chat/completions"
        try:
            response = self.http.post(
                url, data=dumps(body), headers=headers, stream=streaming,
                timeout=self.stream_timeout if streaming else self.timeout,
                allow_redirects=False)
            content_type = response.headers.get("Content-Type", "application/json")
            if not streaming or response.status_code != 200:
                return Reply(response.status_code, response.content, content_type=content_type)
            chunks = response.iter_content(chunk_size=None)
            first = next(chunks, b"")
        except requests.RequestException as exc:
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
        except requests.RequestException as exc:
            log.warning("upstream stream of LLM %s broke: %s", target.name, type(exc).__name__)
            message = f"The upstream stream of LLM '{target.name}' broke ({_reason(exc)})"
            yield b"data: " + dumps(envelope(message, "upstream_error",
                                             "upstream_stream_broken")) + b"\n\n"
        finally:
            response.close()


def _reason(exc) -> str:
    """A short, key-free description of a requests failure."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "unreachable"
    return type(exc).__name__
