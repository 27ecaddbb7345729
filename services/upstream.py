"""Proxying to a public LLM's OpenAI-compatible upstream.

One pooled urllib3 manager per process; every call has (connect, read)
timeouts. Under the gevent worker its sockets are cooperative.
"""
import logging

import urllib3

from jsonio import dumps
from services.errors import BadGateway, envelope
from services.inference import Reply, Target

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


class Upstream:
    def __init__(self, connect_timeout: float, read_timeout: float, stream_idle_timeout: float):
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        # For a stream the read timeout bounds the silence between two reads.
        self.stream_timeout = urllib3.Timeout(connect=connect_timeout, read=stream_idle_timeout)
        self.pool = urllib3.PoolManager(num_pools=32, maxsize=64, block=False, retries=False)

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
            response = self.pool.request(
                "POST", url, body=dumps(body), headers=headers,
                timeout=self.stream_timeout if streaming else self.timeout,
                preload_content=not streaming, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            log.warning("upstream of LLM %s failed: %s", target.name, type(exc).__name__)
            raise BadGateway(f"The upstream of LLM '{target.name}' is unreachable "
                             f"({_reason(exc)})", code="upstream_unreachable") from None
        content_type = response.headers.get("Content-Type", "application/json")
        if not streaming or response.status != 200:
            data = response.data if not streaming else _read_all(response, target)
            return Reply(response.status, data, content_type=content_type)
        try:
            first = response.read1(READ_SIZE)
        except urllib3.exceptions.HTTPError as exc:
            response.close()
            raise BadGateway(f"The upstream stream of LLM '{target.name}' broke "
                             f"({_reason(exc)})", code="upstream_stream_broken") from None
        return Reply(200, stream=self._relay(response, first, target),
                     content_type="text/event-stream")

    def _relay(self, response, first, target):
        finished = False
        try:
            data = first
            while data:
                yield data
                data = response.read1(READ_SIZE)
            finished = True
        except urllib3.exceptions.HTTPError as exc:
            log.warning("upstream stream of LLM %s broke: %s", target.name, type(exc).__name__)
            message = f"The upstream stream of LLM '{target.name}' broke ({_reason(exc)})"
            yield b"data: " + dumps(envelope(message, "upstream_error",
                                             "upstream_stream_broken")) + b"\n\n"
        finally:
            # A half-read connection cannot go back to the pool.
            response.release_conn() if finished else response.close()


def _read_all(response, target):
    try:
        return response.read()
    except urllib3.exceptions.HTTPError as exc:
        raise BadGateway(f"The upstream of LLM '{target.name}' broke ({_reason(exc)})",
                         code="upstream_stream_broken") from None
    finally:
        response.release_conn()


def _reason(exc) -> str:
    """A short, key-free description of a urllib3 failure."""
    inner = getattr(exc, "reason", None) or exc
    name = type(inner).__name__
    if "Timeout" in name or "Timeout" in type(exc).__name__:
        return "timed out"
    if "NewConnectionError" in name or "Refused" in str(inner):
        return "connection refused"
    return name
