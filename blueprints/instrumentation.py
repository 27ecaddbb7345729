"""Per-request operations work (DESIGN.md, "Operations"): the request id in
and out, the access line, the request's metrics and its usage.

`begin` runs before anything else of a request, `end` after everything
else; what is measured to the last byte (a stream's duration, its tokens)
is recorded when the server closes the response. SWITCHBOARD_INSTRUMENT
false turns the request ids, metrics and usage off (a bench setting: no
X-Request-Id then), SWITCHBOARD_ACCESS_LOG false the access line.
"""
import functools
import logging
import time

from flask import g, request

import settings
from services import metrics, request_ids, usage
from services.inference import Route, Target

log = logging.getLogger(__name__)
access_log = logging.getLogger("switchboard.access")


class RequestRecord:
    """What one request did, filled in as it goes."""

    __slots__ = ("started", "request_id", "method", "path", "route", "status", "token_id",
                 "llm", "kind", "stream", "body", "tally", "stream_tally", "first_chunk",
                 "rejection", "instrumented")

    def __init__(self, request_id, method, path, instrumented=True):
        self.started = time.perf_counter()
        self.request_id = request_id
        self.instrumented = instrumented  # metrics and usage are counted
        self.method = method
        self.path = path
        self.route = self.status = self.token_id = self.llm = self.kind = None
        self.stream = False
        self.body = self.tally = self.stream_tally = self.first_chunk = self.rejection = None


class Instrumentation:
    def __init__(self, app=None):
        self.enabled = self.access_log = False
        self.usage = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app):
        app.extensions["instrumentation"] = self
        self.enabled = settings.flag(app.config, "INSTRUMENT")
        self.access_log = settings.flag(app.config, "ACCESS_LOG")
        if self.enabled:
            self.usage = usage.UsageRecorder(
                usage.writer(app), bucket_seconds=int(app.config["USAGE_BUCKET_SECONDS"]),
                flush_interval=float(app.config["USAGE_FLUSH_INTERVAL"]),
                max_pending=int(app.config["USAGE_MAX_PENDING"]))
        if not (self.enabled or self.access_log):
            return
        # First of the before_request functions, last of the after_request ones.
        app.before_request_funcs.setdefault(None, []).insert(0, self.begin)
        app.after_request_funcs.setdefault(None, []).insert(0, self.end)

    def close(self):
        """Write the usage still buffered (the worker stops)."""
        if self.usage is not None:
            self.usage.close()

    # -- the request's life ------------------------------------------------------

    def begin(self):
        request_id = None
        if self.enabled:
            request_id = request_ids.accept(request.headers.get(request_ids.HEADER))
            request_ids.bind(request_id)
        g.record = RequestRecord(request_id, request.method, request.path, self.enabled)

    def end(self, response):
        record = g.get("record")
        if record is None:
            return response
        if record.request_id is not None:
            response.headers[request_ids.HEADER] = record.request_id
        record.status = response.status_code
        rule = request.url_rule
        record.route = rule.rule if rule is not None else None
        caller = g.get("caller")
        if caller is not None:
            record.token_id = caller.id
        response.call_on_close(functools.partial(self.finish, record))
        return response

    def finish(self, record: RequestRecord):
        """The response is closed: record what the request did. Never raises."""
        try:
            duration = time.perf_counter() - record.started
            if self.enabled:
                self._metrics(record, duration)
            if self.access_log:
                access_log.info("%s %s %s %.1f ms%s", record.method, record.path, record.status,
                                1000 * duration, f" llm={record.llm}" if record.llm else "",
                                extra={"method": record.method, "path": record.path,
                                       "status": record.status,
                                       "duration_ms": 1000 * duration,
                                       "llm": record.llm})
        except Exception:
            log.exception("could not record a request's metrics")
        finally:
            if self.enabled:
                request_ids.bind(None)

    def _metrics(self, record, duration):
        metrics.child(metrics.requests_total, metrics.route_label(record.route),
                      metrics.method_label(record.method), str(record.status)).inc()
        rejection = record.rejection
        if rejection is None and record.stream_tally is not None and (
                record.stream_tally.error_code in metrics.REJECTION_CODES):
            rejection = record.stream_tally.error_code
        if rejection is not None:
            metrics.child(metrics.rejections_total, rejection).inc()
        if record.llm is not None:
            self._inference(record, duration)

    def _inference(self, record, duration):
        stream = "true" if record.stream else "false"
        metrics.child(metrics.inference_seconds, record.llm, record.kind, stream).observe(
            duration)
        if record.first_chunk is not None:
            metrics.child(metrics.time_to_first_chunk_seconds, record.llm, record.kind).observe(
                record.first_chunk - record.started)
        if record.stream_tally is not None:
            tally = record.stream_tally.result(record.status, record.body)
        else:
            tally = record.tally or usage.Tally(error=record.status >= 400)
        if tally.prompt_tokens:
            metrics.child(metrics.tokens_total, record.llm, "prompt").inc(tally.prompt_tokens)
        if tally.completion_tokens:
            metrics.child(metrics.tokens_total, record.llm, "completion").inc(
                tally.completion_tokens)
        if record.token_id is not None:
            self.usage.record(record.token_id, record.llm, tally)


def _record() -> RequestRecord | None:
    return g.get("record")


def observed(relay):
    """The relay, its inferences counted as this request's (metrics, usage)."""
    return _ObservedRelay(relay) if _record() is not None else relay


class _ObservedRelay:
    def __init__(self, relay):
        self._relay = relay

    def infer(self, route, body, **kwargs):
        note_inference(route, body)
        return note_reply(self._relay.infer(route, body, **kwargs))


def note_inference(route, body: dict) -> None:
    """The request runs an inference on `route` (a services.inference Route
    or Target): its `llm` label is the LLM's name, or `pool:<model>`."""
    record = _record()
    if record is None:
        return
    if isinstance(route, Target):
        route = Route.single(route)
    record.llm = route.queue
    if route.pool is not None:
        record.kind = "pool"
    else:
        record.kind = str(route.targets[0].kind)
    record.stream = body.get("stream") is True
    record.body = body


def note_reply(reply):
    """The inference's reply, before it goes out: a stream is read as it
    passes (its first chunk, its usage or chunks); a body is read once."""
    record = _record()
    if record is None or record.llm is None or not record.instrumented:
        return reply
    if reply.stream is None:
        record.tally = usage.from_body(reply.status, reply.body)
    else:
        record.stream_tally = usage.StreamTally()
        reply.stream = _TallyingStream(reply.stream, record)
    return reply


def note_rejection(code: str) -> None:
    """The request is refused with a 429 or 503 for this reason."""
    record = _record()
    if record is not None:
        record.rejection = code


class _TallyingStream:
    __slots__ = ("_stream", "_record")

    def __init__(self, stream, record):
        self._stream = stream
        self._record = record

    def __iter__(self):
        return self

    def __next__(self):
        data = next(self._stream)
        record = self._record
        if record.first_chunk is None and b"data:" in data:
            record.first_chunk = time.perf_counter()
        record.stream_tally.feed(data)
        return data

    def close(self):
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
