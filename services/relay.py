"""Inference dispatch: public rows go upstream, virtual rows through the bus.

The virtual path is the seeds' state machine: `inactive` → 503; no live
publisher session → 503 at once; `hibernating` → one shared wake task first;
then an `infer` task whose outcome (or chunks) comes back through the bus.

A pool, or an LLM that declares a capacity, is *scheduled*: the request
first takes a turn in the bus's fair queue (DESIGN.md, "Pools, capacity and
the fair queue"), on the member with the most room; a waiting stream hears
`: queued, position N` now and then. A pool member that fails before the
first byte reached the client is tried once more, on another member.
"""
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field

import settings
from jsonio import dumps, loads
from models import Kind, Status
from services import metrics, request_ids
from services.bus.base import Member, publisher_offline
from services.errors import BadGateway, ClientGone, GatewayTimeout, ServiceError, Unavailable
from services.inference import (CHAT, SSE_KEEPALIVE, Endpoint, Reply, Route, Target, sse_chunk,
                                sse_event)
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
    queue: float = 60.0
    max_queued_per_token: int = 32

    @classmethod
    def from_config(cls, config):
        return cls(pickup=float(config["TASK_PICKUP_TIMEOUT"]),
                   infer=float(config["INFER_TIMEOUT"]),
                   stream_idle=float(config["STREAM_IDLE_TIMEOUT"]),
                   wake=float(config["WAKE_TIMEOUT"]),
                   keepalive=float(config["STREAM_KEEPALIVE"]),
                   max_pending=int(config["MAX_PENDING_PER_LLM"]),
                   queue=float(config["QUEUE_TIMEOUT"]),
                   max_queued_per_token=int(config["MAX_QUEUED_PER_TOKEN"]))


# Failures of a pool member before anything reached the client that another
# member may not share: it is tried once more elsewhere.
FAILOVER_CODES = frozenset({"publisher_error", "publisher_lost", "publisher_disconnected",
                            "publisher_offline", "pickup_timeout", "task_not_acknowledged",
                            "wake_failed", "upstream_unreachable"})


class Relay:
    def __init__(self, bus, upstream: Upstream, timeouts: Timeouts, count_wakes: bool = False):
        self.bus = bus
        self.upstream = upstream
        self.timeouts = timeouts
        self.count_wakes = count_wakes  # switchboard_wakes_total
        self._wakes_counted: dict[str, None] = {}  # task ids, oldest first

    @classmethod
    def from_config(cls, config, bus):
        return cls(bus, Upstream.from_config(config), Timeouts.from_config(config),
                   count_wakes=settings.flag(config, "INSTRUMENT"))

    def infer(self, route: Route | Target, body: dict, client_connected=None,
              token: str = "", endpoint: Endpoint = CHAT, headers=None) -> Reply:
        """Run a body for `endpoint` (chat completions unless said) on the
        route's LLM, or on a member of its pool (the member's `model` replaces
        the body's). `headers` go to a public upstream with it. `token` is the
        caller, for the fair queue's turns. `client_connected()`, when given,
        is asked now and then while a non-streamed request waits: a client
        that hung up cancels its task (ClientGone). Raises Unavailable (503:
        inactive, publisher offline, queue timeout), TooManyRequests (429),
        GatewayTimeout (504), BadGateway (502)."""
        if isinstance(route, Target):
            route = Route.single(route)
        call = Call(body, endpoint, headers or {})
        if not route.scheduled:
            return self._run(route.targets[0], call, client_connected)
        if body.get("stream") is True:
            return self._scheduled_stream(route, call, token, client_connected)
        return self._scheduled(route, call, client_connected, token)

    def _run(self, target: Target, call: "Call", client_connected=None,
             counted: bool = True) -> Reply:
        """One attempt on one LLM. `counted`: whether the request still has
        to count against the LLM's pending limit (a scheduled one was counted
        by the fair queue)."""
        body = {**call.body, "model": target.model}
        if target.kind == Kind.PUBLIC:
            return self._forward(target, call.on(body), counted)
        self._check_available(target)
        if body.get("stream") is True:
            return self._stream(target, call.on(body), counted)
        interval = CLIENT_CHECK_INTERVAL if client_connected else None
        if target.status == Status.HIBERNATING:
            with contextlib.closing(self._wake(target, interval, counted)) as waking:
                for _ in waking:
                    _check_client(client_connected)
        task = {"kind": "infer", "llm": target.name, "endpoint": call.endpoint.path,
                "streaming": False, "body": body, **_request_id()}
        with self.bus.open_task(target.session_id, task,
                                **self._task_args(target, counted=counted)) as task_id:
            while (outcome := self.bus.wait_result(task_id, interval)) is None:
                _check_client(client_connected)
        return self._outcome_reply(target, outcome)

    # -- internals -----------------------------------------------------------

    def _forward(self, target, call, counted=True):
        """To the upstream, within MAX_PENDING_PER_LLM requests in flight (on
        every worker); a stream holds its slot until it is closed."""
        forward = functools.partial(self.upstream.forward, target, call.body,
                                    endpoint=call.endpoint, headers=call.headers)
        if not counted:
            return forward()
        slot = self.bus.acquire_slot(target.name, self.timeouts.max_pending,
                                     routes_version=target.seen_at)
        try:
            reply = forward()
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

    def _task_args(self, target, timeout=None, share_key=None, counted=True):
        return {"llm": target.name, "owner": target.owner,
                "limit": self.timeouts.max_pending if counted else None,
                "pickup_timeout": self.timeouts.pickup,
                "timeout": timeout or self.timeouts.infer, "share_key": share_key,
                "require_live": True}

    def _wake(self, target, keepalive, counted=True):
        """Wake the LLM (sharing an in-flight wake), yielding None every
        `keepalive` seconds while waiting. Raises BadGateway on failure; the
        row stays hibernating (the result view flips it on success)."""
        task = {"kind": "wake", "llm": target.name, **_request_id()}
        args = self._task_args(target, self.timeouts.wake,
                               share_key=f"wake:{target.session_id}:{target.name}",
                               counted=counted)
        with self.bus.open_task(target.session_id, task, **args) as task_id:
            log.info("waiting for LLM %s to wake (task %s)", target.name, task_id)
            try:
                while (outcome := self.bus.wait_result(task_id, keepalive)) is None:
                    yield None
            except GatewayTimeout:
                self._count_wake(target.name, task_id, "timeout")
                raise
        failed = "error" in outcome or not 200 <= int(outcome.get("status", 0)) < 300
        self._count_wake(target.name, task_id, "failed" if failed else "ok")
        if failed:
            log.warning("waking LLM %s failed", target.name)
        if "error" in outcome:
            raise BadGateway(f"Waking LLM '{target.name}' failed: {outcome['error']}",
                             code="wake_failed")
        if not 200 <= int(outcome.get("status", 0)) < 300:
            raise BadGateway(f"Waking LLM '{target.name}' failed with status "
                             f"{outcome.get('status')}", code="wake_failed")

    def _count_wake(self, llm, task_id, outcome):
        """switchboard_wakes_total, once per wake task in this process (its
        waiters share it; a timeout is counted by each worker that waited)."""
        if not self.count_wakes or task_id in self._wakes_counted:
            return
        self._wakes_counted[task_id] = None
        while len(self._wakes_counted) > 1024:
            self._wakes_counted.pop(next(iter(self._wakes_counted)))
        metrics.wakes_total.labels(llm, outcome).inc()

    def _outcome_reply(self, target, outcome):
        if "error" in outcome:
            raise BadGateway(f"The publisher of LLM '{target.name}' failed: {outcome['error']}",
                             code="publisher_error")
        return Reply(int(outcome["status"]), outcome.get("body"))

    def _stream(self, target, call, counted=True):
        """Hold the response headers until the first event (at most one
        keep-alive interval), so early failures keep their HTTP status."""
        events = self._stream_events(target, call, counted)
        try:
            first = next(events, None)
        except BaseException:
            events.close()
            raise
        if first is None:  # the publisher ended the stream without a chunk
            return Reply(200, stream=iter((call.endpoint.end,)), content_type="text/event-stream")
        if first[0] == "outcome":
            events.close()
            return self._outcome_reply(target, first[1])
        return Reply(200, stream=self._sse(target, first, events, call.endpoint),
                     content_type="text/event-stream")

    def _stream_events(self, target, call, counted=True):
        """('keepalive', None) | ('chunks', [str]) | ('outcome', dict), until the stream ends."""
        if target.status == Status.HIBERNATING:
            for _ in self._wake(target, self.timeouts.keepalive, counted):
                yield ("keepalive", None)
        task = {"kind": "infer", "llm": target.name, "endpoint": call.endpoint.path,
                "streaming": True, "body": call.body, **_request_id()}
        with self.bus.open_task(target.session_id, task,
                                **self._task_args(target, counted=counted)) as task_id:
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

    def _sse(self, target, first, events, endpoint):
        try:
            event = first
            while event is not None:
                kind, value = event
                if kind == "keepalive":
                    yield SSE_KEEPALIVE
                elif kind == "chunks":  # what arrived together goes in one write
                    yield b"".join(sse_chunk(chunk) for chunk in value)
                else:  # a result posted after the stream had started
                    yield endpoint.failure_event(self._late_outcome_error(target, value))
                    return
                event = next(events, None)
            yield endpoint.end
        except ServiceError as exc:
            # Headers are gone; OpenAI and Anthropic clients raise on an error event.
            yield endpoint.failure_event(exc)
        finally:
            events.close()

    def _late_outcome_error(self, target, outcome) -> BadGateway:
        message = outcome.get("error") or f"status {outcome.get('status')}"
        return BadGateway(f"The publisher of LLM '{target.name}' failed: {message}",
                          code="publisher_error")


    # -- the fair queue and failover --------------------------------------------

    def _scheduled(self, route, call, client_connected, token):
        failed = None  # the member that failed before the first byte (once)
        while True:
            place = self._enter(route, token, failed)
            try:
                while not self.bus.wait_turn(place, CLIENT_CHECK_INTERVAL):
                    _check_client(client_connected)
                reply = self._run(route.target(place.member), call, client_connected,
                                  counted=False)
            except ServiceError as exc:
                if self._fail_over(route, exc, failed, place.member):
                    failed = place.member
                    continue
                raise
            finally:
                self.bus.leave_queue(place)
            if self._fail_over(route, reply, failed, place.member):
                failed = place.member
                continue
            return reply

    def _scheduled_stream(self, route, call, token, client_connected):
        """A stream whose turn comes at once is answered as any stream (its
        headers wait for its first event); one that must wait is committed
        to 200 now and hears where it stands in the queue."""
        failed = None
        while True:
            place = self._enter(route, token, failed)
            if place.member is None:
                break
            try:
                reply = self._granted_stream(route, call, place)
            except ServiceError as exc:
                if self._fail_over(route, exc, failed, place.member):
                    failed = place.member
                    continue
                raise
            if self._fail_over(route, reply, failed, place.member):
                failed = place.member
                continue
            return reply
        holder = {"place": place}
        return Reply(200, stream=_ClosingStream(
            self._queued_stream(route, call, token, holder, failed, client_connected),
            lambda: self.bus.leave_queue(holder["place"])), content_type="text/event-stream")

    def _granted_stream(self, route, call, place):
        """Run the stream on the member the place was granted; the turn is
        given back when the stream closes (or at once, if it never opened)."""
        try:
            reply = self._run(route.target(place.member), call, counted=False)
        except BaseException:
            self.bus.leave_queue(place)
            raise
        if reply.stream is None:
            self.bus.leave_queue(place)
        else:
            reply.stream = _ClosingStream(reply.stream, lambda: self.bus.leave_queue(place))
        return reply

    def _queued_stream(self, route, call, token, holder, failed, client_connected):
        """The SSE bytes of a stream that waits for its turn: `: queued,
        position N` at once and every keep-alive interval, then the stream
        itself; a failure is its last event. `holder["place"]` is the place
        held now (another one after a failover). A client that left gives its
        place up within CLIENT_CHECK_INTERVAL."""
        place = holder["place"]
        check_every = CLIENT_CHECK_INTERVAL if client_connected else self.timeouts.keepalive
        try:
            while True:
                yield _queued_comment(place)
                said = time.monotonic()
                while not self.bus.wait_turn(place, min(check_every, self.timeouts.keepalive)):
                    _check_client(client_connected)
                    if time.monotonic() - said >= self.timeouts.keepalive:
                        yield _queued_comment(place)
                        said = time.monotonic()
                try:
                    reply = self._run(route.target(place.member), call, counted=False)
                except ServiceError as exc:
                    if not self._fail_over(route, exc, failed, place.member):
                        raise
                    reply = None
                if reply is not None and not self._fail_over(route, reply, failed, place.member):
                    if reply.stream is None:  # the backend answered with an error status
                        yield _reply_error(route, reply, call.endpoint)
                        return
                    try:
                        yield from reply.stream
                    finally:
                        reply.stream.close()
                    return
                self.bus.leave_queue(place)
                failed = place.member
                place = holder["place"] = self._enter(route, token, failed)
        except ServiceError as exc:  # headers are gone: the last event says what happened
            yield call.endpoint.failure_event(exc)
        finally:
            self.bus.leave_queue(place)

    def _enter(self, route, token, failed):
        """A place in the route's fair queue, on its awake members but the
        one that failed; on a hibernating one (woken) when none is awake."""
        members = [t for t in route.targets if t.name != failed]
        if not members:
            members = [t for t in route.asleep if t.name != failed][:1]
        if not members:
            raise Unavailable(f"No member of {route.label} can answer now",
                              code="pool_unavailable")
        single = members[0]
        if route.pool is None and single.kind == Kind.VIRTUAL:
            # One LLM: offline is a 503 at once, not a wait in line.
            self._check_available(single)
            if not self.bus.is_live(single.session_id):
                raise publisher_offline(single.name)
        return self.bus.enter_queue(
            route.queue, token, [Member(t.name, t.max_concurrency, t.session_id)
                                 for t in members],
            limit=self.timeouts.max_pending, per_token=self.timeouts.max_queued_per_token,
            timeout=self.timeouts.queue)

    def _fail_over(self, route, failure, failed, member) -> bool:
        """Whether to try another member: a pool, a first failure before the
        first byte (an error, or an answer of status 5xx), and another member."""
        if route.pool is None or failed is not None:
            return False
        if isinstance(failure, Reply):
            if failure.stream is not None or failure.status < 500:
                return False
        elif getattr(failure, "code", None) not in FAILOVER_CODES:
            return False
        others = [t for t in route.targets + route.asleep if t.name != member]
        if others:
            log.warning("%s: member %s failed before the first byte; trying another",
                        route.label, member)
        return bool(others)


def _request_id() -> dict:
    """The task's `request_id` field: the id of the request it serves."""
    request_id = request_ids.current()
    return {"request_id": request_id} if request_id else {}


def _queued_comment(place) -> bytes:
    return f": queued, position {place.position}\n\n".encode()


def _reply_error(route, reply, endpoint) -> bytes:
    """An answer with an error status, as a stream's last event: the
    backend's own error body when it gave one."""
    body = reply.body
    if isinstance(body, bytes | str):
        try:
            body = loads(body)
        except ValueError:
            body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        event = sse_event(dumps(body))
        return b"event: error\n" + event if endpoint.anthropic else event
    return endpoint.error_event(reply.status, f"{route.label} answered status {reply.status}",
                                BadGateway.type, "upstream_error")


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


@dataclass(frozen=True, slots=True)
class Call:
    """What the client asked: the body, for which endpoint, and the headers
    that go on to a public upstream with it."""

    body: dict
    endpoint: Endpoint = CHAT
    headers: dict = field(default_factory=dict)

    def on(self, body: dict) -> "Call":
        """The same call with another body (the member's `model` in it)."""
        return Call(body, self.endpoint, self.headers)
