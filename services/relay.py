"""Inference dispatch: public rows go upstream, virtual rows through the bus.

The virtual path is the seeds' state machine: `inactive` → 503; no live
publisher session → 503 at once; `hibernating` → one shared wake task first;
then an `infer` task whose outcome (or chunks) comes back through the bus.
"""
import contextlib
import logging
from dataclasses import dataclass

from jsonio import dumps
from models import Kind, Status
from services.bus.base import publisher_offline
from services.errors import BadGateway, ClientGone, ServiceError, Unavailable, envelope
from services.inference import SSE_DONE, SSE_KEEPALIVE, Reply, Target, sse_event
from services.upstream import Upstream

log = logging.getLogger(__name__)

# How often a non-streamed request waiting on a publisher checks that its
# client is still there (a stream notices on its next write).
CLIENT_CHECK_INTERVAL = 2.0


@dataclass(frozen=True)
class Timeouts:
    pickup: float
    infer: float
    stream_idle: float
    wake: float
    keepalive: float
    max_pending: int

    @classmethod
    def from_config(cls, config):
        return cls(pickup=float(config["TASK_PICKUP_TIMEOUT"]),
                   infer=float(config["INFER_TIMEOUT"]),
                   stream_idle=float(config["STREAM_IDLE_TIMEOUT"]),
                   wake=float(config["WAKE_TIMEOUT"]),
                   keepalive=float(config["STREAM_KEEPALIVE"]),
                   max_pending=int(config["MAX_PENDING_PER_LLM"]))


class Relay:
    def __init__(self, bus, upstream: Upstream, timeouts: Timeouts):
        self.bus = bus
        self.upstream = upstream
        self.timeouts = timeouts

    @classmethod
    def from_config(cls, config, bus):
        return cls(bus, Upstream.from_config(config), Timeouts.from_config(config))

    def infer(self, target: Target, body: dict, client_connected=None) -> Reply:
        """Run a chat-completions body on the target LLM (its `model` replaces
        the body's). `client_connected()`, when given, is asked now and then
        while a non-streamed request waits: a client that hung up cancels
        its task (ClientGone). Raises Unavailable (503: inactive, publisher
        offline), TooManyRequests (429), GatewayTimeout (504), BadGateway (502)."""
        body = {**body, "model": target.model}
        if target.kind == Kind.PUBLIC:
            return self._forward(target, body)
        self._check_available(target)
        if body.get("stream") is True:
            return self._stream(target, body)
        interval = CLIENT_CHECK_INTERVAL if client_connected else None
        if target.status == Status.HIBERNATING:
            with contextlib.closing(self._wake(target, interval)) as waking:
                for _ in waking:
                    _check_client(client_connected)
        task = {"kind": "infer", "llm": target.name, "streaming": False, "body": body}
        with self.bus.open_task(target.session_id, task, **self._task_args(target)) as task_id:
            while (outcome := self.bus.wait_result(task_id, interval)) is None:
                _check_client(client_connected)
        return self._outcome_reply(target, outcome)

    # -- internals -----------------------------------------------------------

    def _forward(self, target, body):
        """To the upstream, within MAX_PENDING_PER_LLM requests in flight (on
        every worker); a stream holds its slot until it is closed."""
        slot = self.bus.acquire_slot(target.name, self.timeouts.max_pending)
        try:
            reply = self.upstream.forward(target, body)
        except BaseException:
            self.bus.release_slot(slot)
            raise
        if reply.stream is None:
            self.bus.release_slot(slot)
        else:
            reply.stream = _ClosingStream(reply.stream, lambda: self.bus.release_slot(slot))
        return reply

    def _check_available(self, target):
        """Inactive rows, and rows without a session, are 503 at once (a
        session that is not live is refused by the bus, in the same step as
        the task is queued)."""
        if target.status == Status.INACTIVE:
            raise Unavailable(f"Virtual LLM '{target.name}' is inactive; publisher offline",
                              code="publisher_offline")
        if not target.session_id:
            raise publisher_offline(target.name)

    def _task_args(self, target, timeout=None, share_key=None):
        return {"llm": target.name, "owner": target.owner, "limit": self.timeouts.max_pending,
                "pickup_timeout": self.timeouts.pickup,
                "timeout": timeout or self.timeouts.infer, "share_key": share_key,
                "require_live": True}

    def _wake(self, target, keepalive):
        """Wake the LLM (sharing an in-flight wake), yielding None every
        `keepalive` seconds while waiting. Raises BadGateway on failure; the
        row stays hibernating (the result view flips it on success)."""
        task = {"kind": "wake", "llm": target.name}
        args = self._task_args(target, self.timeouts.wake,
                               share_key=f"wake:{target.session_id}:{target.name}")
        with self.bus.open_task(target.session_id, task, **args) as task_id:
            log.info("waiting for LLM %s to wake (task %s)", target.name, task_id)
            while (outcome := self.bus.wait_result(task_id, keepalive)) is None:
                yield None
        if "error" in outcome or not 200 <= int(outcome.get("status", 0)) < 300:
            log.warning("waking LLM %s failed", target.name)
        if "error" in outcome:
            raise BadGateway(f"Waking LLM '{target.name}' failed: {outcome['error']}",
                             code="wake_failed")
        if not 200 <= int(outcome.get("status", 0)) < 300:
            raise BadGateway(f"Waking LLM '{target.name}' failed with status "
                             f"{outcome.get('status')}", code="wake_failed")

    def _outcome_reply(self, target, outcome):
        if "error" in outcome:
            raise BadGateway(f"The publisher of LLM '{target.name}' failed: {outcome['error']}",
                             code="publisher_error")
        return Reply(int(outcome["status"]), outcome.get("body"))

    def _stream(self, target, body):
        """Hold the response headers until the first event (at most one
        keep-alive interval), so early failures keep their HTTP status."""
        events = self._stream_events(target, body)
        try:
            first = next(events, None)
        except BaseException:
            events.close()
            raise
        if first is None:  # the publisher ended the stream without a chunk
            return Reply(200, stream=iter((SSE_DONE,)), content_type="text/event-stream")
        if first[0] == "outcome":
            events.close()
            return self._outcome_reply(target, first[1])
        return Reply(200, stream=self._sse(target, first, events),
                     content_type="text/event-stream")

    def _stream_events(self, target, body):
        """('keepalive', None) | ('chunks', [str]) | ('outcome', dict), until the stream ends."""
        if target.status == Status.HIBERNATING:
            for _ in self._wake(target, self.timeouts.keepalive):
                yield ("keepalive", None)
        task = {"kind": "infer", "llm": target.name, "streaming": True, "body": body}
        with self.bus.open_task(target.session_id, task, **self._task_args(target)) as task_id:
            while True:
                chunks, done, outcome = self.bus.next_chunks(
                    task_id, self.timeouts.stream_idle, self.timeouts.keepalive)
                if outcome is not None:
                    yield ("outcome", outcome)
                    return
                if chunks:
                    yield ("chunks", chunks)
                if done:
                    return
                if not chunks:
                    yield ("keepalive", None)

    def _sse(self, target, first, events):
        try:
            event = first
            while event is not None:
                kind, value = event
                if kind == "keepalive":
                    yield SSE_KEEPALIVE
                elif kind == "chunks":
                    yield b"".join(sse_event(chunk.encode()) for chunk in value)
                else:  # a result posted after the stream had started
                    yield sse_event(dumps(self._late_outcome_error(target, value)))
                    return
                event = next(events, None)
            yield SSE_DONE
        except ServiceError as exc:
            # Headers are gone; OpenAI clients raise on an `error` event.
            yield sse_event(dumps(envelope(exc.message, exc.type, exc.code)))
        finally:
            events.close()

    def _late_outcome_error(self, target, outcome):
        message = outcome.get("error") or f"status {outcome.get('status')}"
        return envelope(f"The publisher of LLM '{target.name}' failed: {message}",
                        BadGateway.type, "publisher_error")


def _check_client(client_connected):
    if client_connected is not None and not client_connected():
        raise ClientGone("The client went away")


class _ClosingStream:
    """An SSE byte stream that runs `on_close` once when the server closes it,
    even if it was never iterated (a generator's `finally` would not run)."""

    def __init__(self, stream, on_close):
        self._stream = stream
        self._on_close = on_close

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._stream)

    def close(self):
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            try:
                self._stream.close()
            finally:
                on_close()
