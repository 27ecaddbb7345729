"""Usage accounting (DESIGN.md, "Operations"): every inference counted per
token and LLM in time buckets, off the hot path.

A request adds its counts to this worker's buffer (`UsageRecorder.record`: a
dict update under a lock, nothing else); a background thread (a greenlet
under gevent) writes the buffer every `flush_interval` seconds in one
upsert, and once more when the worker stops. Counting never fails or slows
an inference: a write that fails keeps its rows for the next flush, and a
buffer that is full (`max_pending` distinct bucket × token × LLM rows, which
only a database away for long can fill) drops what does not fit, counting it
in `switchboard_usage_dropped_total` and saying so in the log.

Counts come from the backend's `usage`; a stream that carries none is
counted from its chunks (one completion token per chunk with content, the
prompt's characters / 4) and marked `estimated`.
"""
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import sqlalchemy as sa

from models import ApiToken, UsageBucket
from services import metrics

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 1 << 20  # a stream's unfinished event beyond this is not tallied
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class Tally:
    """What one inference spent."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: bool = False
    estimated: bool = False


def _count(usage: dict, *names) -> int | None:
    """The first of `names` in `usage` that is a count."""
    for name in names:
        value = usage.get(name)
        if type(value) is int and value >= 0:
            return value
    return None


def _tokens(usage) -> tuple[int | None, int | None]:
    """(prompt, completion) of a `usage`, in OpenAI's names or in those of
    responses and Anthropic's messages (`input_tokens`, `output_tokens`); an
    embedding's has no completion. None where it says nothing."""
    if not isinstance(usage, dict):
        return None, None
    return (_count(usage, "prompt_tokens", "input_tokens"),
            _count(usage, "completion_tokens", "output_tokens"))


def from_body(status: int, body) -> Tally:
    """A non-streamed answer: its status and body (bytes, or JSON-able)."""
    tally = Tally(error=status >= 400)
    usage = None
    if isinstance(body, bytes | bytearray):
        if b'"usage"' in body:
            try:
                usage = orjson.loads(body).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                usage = None
    elif isinstance(body, dict):
        usage = body.get("usage")
    prompt, completion = _tokens(usage)
    if prompt is not None:
        tally.prompt_tokens, tally.completion_tokens = prompt, completion or 0
    return tally


# Events of a stream that carry generated text, by their `type` (responses,
# Anthropic's messages); chat and completions chunks are told by their choices.
TEXT_EVENTS = frozenset({"response.output_text.delta", "content_block_delta"})


class StreamTally:
    """Reads an SSE byte stream (chat, completions, responses or Anthropic's
    messages) as it goes by: the last `usage` it carries (Anthropic's comes
    in two parts: input at the start, output at the end), else its chunks
    with content; an `error` event."""

    __slots__ = ("prompt", "completion", "chunks", "error", "error_code", "_rest")

    def __init__(self):
        self.prompt = self.completion = None
        self.chunks = 0
        self.error = False
        self.error_code = None  # of the first error event
        self._rest = b""

    def feed(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
        *events, rest = data.split(b"\n\n")
        self._rest = rest if len(rest) <= MAX_EVENT_BYTES else b""
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._payload(line[5:].strip())

    def _payload(self, payload: bytes) -> None:
        if not payload.startswith(b"{"):
            return  # [DONE]
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            if not self.error and isinstance(chunk["error"], dict):
                self.error_code = chunk["error"].get("code")
            self.error = True
        for holder in (chunk, chunk.get("response"), chunk.get("message")):
            if isinstance(holder, dict) and "usage" in holder:
                prompt, completion = _tokens(holder["usage"])
                self.prompt = self.prompt if prompt is None else prompt
                self.completion = self.completion if completion is None else completion
        if chunk.get("type") in TEXT_EVENTS or _has_text(chunk.get("choices")):
            self.chunks += 1

    @property
    def usage(self) -> tuple[int, int] | None:
        if self.prompt is None:
            return None
        return self.prompt, self.completion or 0

    def result(self, status: int, body: dict | None) -> Tally:
        """The stream's tally; without `usage`, estimated from its chunks and
        the request `body`'s messages."""
        tally = Tally(error=self.error or status >= 400)
        if self.usage is not None:
            tally.prompt_tokens, tally.completion_tokens = self.usage
        else:
            tally.prompt_tokens = estimate_prompt_tokens(body)
            tally.completion_tokens = self.chunks
            tally.estimated = True
        return tally


def _has_text(choices) -> bool:
    """Whether a chat chunk's or a completion's choices carry text or a tool call."""
    return isinstance(choices, list) and any(
        isinstance(c, dict) and (c.get("text") or isinstance(c.get("delta"), dict) and (
            c["delta"].get("content") or c["delta"].get("tool_calls")))
        for c in choices)


def estimate_prompt_tokens(body: dict | None) -> int:
    """About a token per CHARS_PER_TOKEN characters of the messages' text
    (or of a completion's `prompt`, a response's `input` when they are text)."""
    body = body or {}
    chars = sum(len(body[key]) for key in ("prompt", "input") if isinstance(body.get(key), str))
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return math.ceil(chars / CHARS_PER_TOKEN)


# -- the buffer and its writer ------------------------------------------------------

class UsageRecorder:
    """This worker's usage not yet written. `write(rows)` stores a list of
    row dicts (raises on failure); `clock()` is wall time in seconds."""

    def __init__(self, write, *, bucket_seconds: int = 3600, flush_interval: float = 2.0,
                 max_pending: int = 10_000, clock=time.time):
        self.write = write
        self.bucket_seconds = int(bucket_seconds)
        self.flush_interval = float(flush_interval)
        self.max_pending = int(max_pending)
        self.clock = clock
        self._pending: dict[tuple, list] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped_said = 0.0

    def record(self, token_id: str, llm: str, tally: Tally) -> None:
        """Count one request. Never blocks on anything but the buffer's lock;
        never raises."""
        now = self.clock()
        bucket = int(now // self.bucket_seconds) * self.bucket_seconds
        key = (bucket, token_id, llm)
        with self._lock:
            row = self._pending.get(key)
            if row is None:
                if len(self._pending) >= self.max_pending:
                    self._dropped(1)
                    return
                row = self._pending[key] = [0, 0, 0, 0, False]
            row[0] += 1
            row[1] += tally.error
            row[2] += tally.prompt_tokens
            row[3] += tally.completion_tokens
            row[4] = row[4] or tally.estimated
        if self._thread is None:
            self._start()

    def flush(self) -> int:
        """Write what is buffered; returns how many rows were written (0 on a
        failure, whose rows stay buffered for the next flush). Never raises."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return 0
            rows = [{"bucket_start": datetime.fromtimestamp(key[0], UTC).replace(tzinfo=None),
                     "token_id": key[1], "llm": key[2], "requests": row[0], "errors": row[1],
                     "prompt_tokens": row[2], "completion_tokens": row[3], "estimated": row[4]}
                    for key, row in sorted(pending.items())]  # one lock order on every worker
            try:
                self.write(rows)
            except Exception as exc:  # the database away, locked, a bug: keep the counts
                log.warning("could not write usage (%s): %d rows kept for the next try",
                            type(exc).__name__, len(rows))
                self._put_back(pending)
                return 0
            return len(rows)

    def close(self) -> None:
        """Stop the writer and write what is left (a worker's graceful exit)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.flush_interval + 5)
        self.flush()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _put_back(self, pending):
        with self._lock:
            for key, row in pending.items():
                mine = self._pending.get(key)
                if mine is None:
                    if len(self._pending) >= self.max_pending:
                        self._dropped(1)
                        continue
                    self._pending[key] = row
                else:
                    mine[:4] = [a + b for a, b in zip(mine[:4], row[:4])]
                    mine[4] = mine[4] or row[4]

    def _dropped(self, n):
        metrics.usage_dropped_total.inc(n)
        now = time.monotonic()
        if now - self._dropped_said > 60:
            self._dropped_said = now
            log.warning("usage buffer full (%d rows not yet written): usage is being dropped",
                        self.max_pending)

    def _start(self):
        with self._flush_lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stopping.wait(self.flush_interval):
            self.flush()


# A flush waits this long at most for a lock (another writer, a gc-sweep):
# on SQLite the wait blocks the whole gevent worker, so it gives up soon and
# the rows wait for the next flush instead.
WRITE_LOCK_TIMEOUT = 0.1


def writer(app):
    """`write(rows)` for a UsageRecorder: one upsert in its own app context
    (its own session), committed."""
    from extensions import db
    from services.database import milliseconds

    def write(rows):
        with app.app_context():
            try:
                connection = db.session.connection()
                if connection.dialect.name == "postgresql":
                    connection.execute(sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                                       {"ms": str(milliseconds(WRITE_LOCK_TIMEOUT))})
                elif connection.dialect.name == "sqlite":
                    raw = connection.connection.dbapi_connection
                    raw.execute(f"PRAGMA busy_timeout = {milliseconds(WRITE_LOCK_TIMEOUT)}")
                try:
                    upsert(db.session, rows)  # takes the write lock (WAL: commit waits not)
                finally:
                    if connection.dialect.name == "sqlite":
                        raw.execute(f"PRAGMA busy_timeout = "
                                    f"{milliseconds(app.config['SQLITE_BUSY_TIMEOUT'])}")
                db.session.commit()
            except BaseException:
                db.session.rollback()
                raise
            finally:
                db.session.remove()
    return write


def upsert(session, rows: list[dict]) -> None:
    """Add `rows` to the stored buckets (INSERT ... ON CONFLICT DO UPDATE)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = UsageBucket.__table__
    statement = insert(table)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.bucket_start, table.c.token_id, table.c.llm],
        set_={"requests": table.c.requests + excluded.requests,
              "errors": table.c.errors + excluded.errors,
              "prompt_tokens": table.c.prompt_tokens + excluded.prompt_tokens,
              "completion_tokens": table.c.completion_tokens + excluded.completion_tokens,
              "estimated": sa.or_(table.c.estimated, excluded.estimated)})
    session.execute(statement, rows)


# -- reading it back ------------------------------------------------------------------

def summary(session, since: datetime, until: datetime, token: str | None = None,
            bucket_seconds: int = 3600) -> list[dict]:
    """Usage between `since` and `until` (naive UTC datetimes), one dict per
    token × LLM: `{token, llm, requests, errors, prompt_tokens,
    completion_tokens, estimated}` (`token` is the token's name), sorted by
    token then LLM. With `token` (a token's id), that token's rows only.
    Counts are kept per bucket of `bucket_seconds`: a bucket that overlaps
    the window counts whole. What workers hold unwritten (at most
    USAGE_FLUSH_INTERVAL old) is not in it yet."""
    u = UsageBucket
    query = (sa.select(ApiToken.name, u.llm, sa.func.sum(u.requests), sa.func.sum(u.errors),
                       sa.func.sum(u.prompt_tokens), sa.func.sum(u.completion_tokens),
                       sa.func.max(sa.cast(u.estimated, sa.Integer)))
             .join(ApiToken, ApiToken.id == u.token_id)
             .where(u.bucket_start > since - timedelta(seconds=bucket_seconds),
                    u.bucket_start < until)
             .group_by(ApiToken.name, u.llm).order_by(ApiToken.name, u.llm))
    if token is not None:
        query = query.where(u.token_id == token)
    return [{"token": name, "llm": llm, "requests": int(requests), "errors": int(errors),
             "prompt_tokens": int(prompt), "completion_tokens": int(completion),
             "estimated": bool(estimated)}
            for name, llm, requests, errors, prompt, completion, estimated
            in session.execute(query)]
