"""Post every running stream's chunks to the server together: one sender
thread per publisher, one `POST /publishers/<sid>/chunks` per batch window,
whatever the number of streams (DESIGN.md, "Streams at a real model's pace").

Each backend reader puts its chunks into its own `Stream`; the sender posts
what all the streams have gathered once the oldest waiting chunk is a window
old. The window grows with the number of running streams (MIN_WINDOW for a
lone one, up to MAX_WINDOW under many), and a stream's first chunk and its
end go within a quarter of it (MIN_WINDOW at least), first in their post: a
client's first token and its `[DONE]` come quickly, the tokens between ride
in shared posts.
Chunks that arrive while a post is in flight wait for the next one.

Each entry carries `seq` (the stream's chunks the server has accepted), so a
retried POST never duplicates text. The server answers per entry: a 410 (the
client went away) stops that stream only, a 429 (its client reads slowly)
holds that stream's chunks for a moment; a POST the server cannot take at
all is retried with backoff, then its streams stop.
"""
import logging
import threading
import time

from publisher_client.backoff import Backoff
from publisher_client.errors import ServerError, ServerUnavailable

log = logging.getLogger(__name__)

MAX_ENTRIES = 256             # the server's cap on one POST
MAX_CHUNKS = 2048             # chunks in one POST
MAX_ENTRY_CHUNKS = 64         # of one stream in one POST (under the server's buffer per stream)
MAX_BYTES = 1024 * 1024       # well under the server's 4 MiB body limit
MAX_QUEUED = 256              # a stream's unsent chunks; then its reader waits
MIN_WINDOW = 0.002            # a lone stream's chunks go this soon
PER_STREAM_WINDOW = 0.0012    # each more running stream widens the window this much
MAX_WINDOW = 0.05
URGENT_SHARE = 0.25           # a first chunk or an end waits this share of the window
MAX_ATTEMPTS = 8              # per POST, with backoff: about a minute of server trouble
SLOW_CLIENT_PAUSE = 0.25      # a stream whose client reads slowly (429) waits this long
IDLE_TICK = 1.0               # the sender looks at least this often, even idle
FINISH_TIMEOUT = 300.0        # finish() gives up waiting for the sender after this long


class Stream:
    """One task's stream, fed by its backend reader: `put` each chunk, then
    `finish` (or `cancel`). `sent`: chunks the server accepted; `posts`:
    POSTs that carried some of them."""

    def __init__(self, sender: "SessionSender", session_id: str, task_id: str, on_gone):
        self.sender = sender
        self.session_id = session_id
        self.task_id = task_id
        self.on_gone = on_gone
        self.sent = 0
        self.posts = 0
        self.pending: list[str] = []   # not yet accepted, oldest first
        self.since: float | None = None  # when the oldest pending chunk (or the end) came
        self.end_done: bool | None = None  # set by finish(): whether the stream ends `done`
        self.retry_at = 0.0
        self.slowed = False               # told a 429 once (logged once)
        self.taken_at = 0.0               # when the sender last took chunks of it
        self.gone = threading.Event()      # stopped early: the client went away, or failure
        self.finished = threading.Event()  # nothing more to do, either way

    def put(self, data: str):
        """Queue a chunk; waits while this stream has MAX_QUEUED unsent (the
        server holds it back), and drops it once the stream has stopped."""
        with self.sender._cond:
            while len(self.pending) >= self.sender.max_queued and not self.gone.is_set():
                self.sender._cond.wait(0.1)
            if self.gone.is_set():
                return
            self._add(data)

    def offer(self, data: str) -> bool:
        """Queue a chunk without waiting (the body reader's way: it reads
        for every stream, so it cannot wait for one); False once the stream
        has no room for more (or has stopped)."""
        with self.sender._cond:
            if self.gone.is_set():
                return False
            self._add(data)
            return len(self.pending) < self.sender.max_queued

    def has_room(self) -> bool:
        return len(self.pending) < self.sender.max_queued or self.gone.is_set()

    def finish(self, done: bool = True, last: str | None = None,
               timeout: float = FINISH_TIMEOUT) -> bool:
        """Send what is left and wait until the server has it. The last entry
        carries `done` and ends with `last` (the stream's "[DONE]": in the
        same entry as `done`, a client never sees the end of a stream the
        server does not know has ended). Returns False when the stream
        stopped early (gone)."""
        with self.sender._cond:
            if not self.gone.is_set():
                if last is not None:
                    self._add(last)
                self.end_done = done
                self.since = self.since or self.sender.clock()
                self.sender._cond.notify_all()
        self.finished.wait(timeout)
        return self.finished.is_set() and not self.gone.is_set()

    def cancel(self):
        """Drop what is queued; the backend is already stopping."""
        with self.sender._cond:
            self.gone.set()
            self.pending.clear()
            self.sender._forget(self)
            self.finished.set()

    def _add(self, data):
        if not self.pending:
            self.since = self.sender.clock()
        self.pending.append(data)
        self.sender._nudge(self)

    def _urgent(self) -> bool:
        """Its first chunk, or its end, is waiting."""
        return self.sent == 0 or self.end_done is not None

    def _ready(self, now) -> bool:
        return (bool(self.pending) or self.end_done is not None) and now >= self.retry_at


class SessionSender:
    """The one sender of a publisher's streams. `post(session_id, entries)`
    sends one batch and returns the server's per-entry results; it may raise
    ServerUnavailable (retried, same seq: the server deduplicates) or
    ServerError (the session itself was refused: its streams stop)."""

    def __init__(self, post, max_entries=MAX_ENTRIES, max_chunks=MAX_CHUNKS,
                 max_entry_chunks=MAX_ENTRY_CHUNKS, max_bytes=MAX_BYTES, max_queued=MAX_QUEUED,
                 min_window=MIN_WINDOW,
                 per_stream_window=PER_STREAM_WINDOW, max_window=MAX_WINDOW, backoff=None,
                 max_attempts=MAX_ATTEMPTS, clock=time.monotonic):
        self.post = post
        self.max_entries = max_entries
        self.max_chunks = max_chunks
        self.max_entry_chunks = max_entry_chunks
        self.max_bytes = max_bytes
        self.max_queued = max_queued
        self.min_window = min_window
        self.per_stream_window = per_stream_window
        self.max_window = max_window
        self.backoff = backoff or Backoff(base=0.25, cap=10.0)
        self.max_attempts = max_attempts
        self.clock = clock
        self.posts = 0
        self._cond = threading.Condition()
        self._streams: dict[str, Stream] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wakes_at: float | None = None   # when the sender's wait ends; None: not waiting

    def open(self, session_id: str, task_id: str, on_gone=lambda: None) -> Stream:
        """A new stream of the session's task. `on_gone()` is called once
        when it has to stop early, to abort the backend request."""
        stream = Stream(self, session_id, task_id, on_gone)
        with self._cond:
            self._streams[task_id] = stream
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="chunk-sender",
                                                daemon=True)
                self._thread.start()
        return stream

    def close(self, timeout: float = 5.0):
        """Stop every stream and the sender thread."""
        with self._cond:
            self._closed = True
            streams = list(self._streams.values())
            self._cond.notify_all()
        for stream in streams:
            self._stop(stream)
        if self._thread is not None:
            self._thread.join(timeout)

    def window(self) -> float:
        """How long the oldest waiting chunk may wait for company, now."""
        return min(self.max_window,
                   self.min_window + self.per_stream_window * max(0, len(self._streams) - 1))

    # -- the sender thread ------------------------------------------------------

    def _run(self):
        try:
            while True:
                batch = self._gather()
                if batch is None:
                    return
                self._send(*batch)
        except Exception:  # never leave backends streaming into the void
            log.exception("chunk sender failed")
            with self._cond:
                streams = list(self._streams.values())
            for stream in streams:
                self._stop(stream)

    def _gather(self):
        """Wait for the window, then take (session_id, [(stream, entry, taken, done)])."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = self.clock()
                ready = [s for s in self._streams.values() if s._ready(now)]
                if not ready:
                    retry = [s.retry_at for s in self._streams.values()
                             if s.retry_at > now and (s.pending or s.end_done is not None)]
                    self._sleep(now, min([IDLE_TICK, *(at - now for at in retry)]))
                    continue
                due = min((s.since or now) + self._wait(s) for s in ready)
                if now >= due or self._full(ready):
                    return self._take(ready)
                self._sleep(now, due - now)

    def _sleep(self, now, timeout):
        self._wakes_at = now + timeout
        try:
            self._cond.wait(timeout)
        finally:
            self._wakes_at = None

    def _nudge(self, stream):
        """A chunk came (the condition held): wake the sender only when this
        stream is due before the sender would look anyway, or fills its share
        of a post. Waking it for every chunk would cost more than the posts."""
        if self._wakes_at is None:   # sending: it looks at every stream next
            return
        if (len(stream.pending) >= min(self.max_entry_chunks, self.max_chunks)
                or stream.since + self._wait(stream) < self._wakes_at):
            self._cond.notify_all()

    def _wait(self, stream) -> float:
        """How long a stream's oldest waiting chunk may wait for company."""
        window = self.window()
        if stream._urgent():
            return max(self.min_window, window * URGENT_SHARE)
        return window

    def _full(self, ready) -> bool:
        return (len(ready) >= self.max_entries
                or sum(min(len(s.pending), self.max_entry_chunks) for s in ready)
                >= self.max_chunks
                or any(len(s.pending) >= self.max_entry_chunks for s in ready))

    def _take(self, ready):
        batch, chunks, size, now = [], 0, 0, self.clock()
        # First chunks and ends lead: the server wakes the clients in the
        # order of the entries, and those are the ones a client waits for.
        ready.sort(key=lambda s: (not s._urgent(), s.since or now))
        session_id = ready[0].session_id
        for stream in ready:
            if stream.session_id != session_id:
                continue   # another session's (after a new register): the next post
            if (len(batch) >= self.max_entries or chunks >= self.max_chunks
                    or size >= self.max_bytes):
                break
            stream.taken_at = now
            taken = 0
            for data in stream.pending:
                if taken and (chunks + taken >= self.max_chunks or taken >= self.max_entry_chunks
                              or size + len(data) >= self.max_bytes):
                    break
                taken += 1
                size += len(data)
            chunks += taken
            done = stream.end_done is True and taken == len(stream.pending)
            entry = {"task_id": stream.task_id, "seq": stream.sent,
                     "chunks": [_chunk(data) for data in stream.pending[:taken]]}
            if done:
                entry["done"] = True
            if not taken and not done:  # an end without `done` and nothing left: over
                self._forget(stream)
                stream.finished.set()
                continue
            batch.append((stream, entry, taken, done))
        return session_id, batch

    def _send(self, session_id, batch):
        if not batch:
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                results = self.post(session_id, [entry for _, entry, _, _ in batch])
                if not isinstance(results, list) or len(results) != len(batch):
                    raise ServerError("the server's answer to a chunk batch does not match it")
                break
            except ServerUnavailable as exc:
                if attempt >= self.max_attempts or all(s.gone.is_set() for s, *_ in batch):
                    log.warning("giving up on %d stream(s) after %d attempts: %s",
                                len(batch), attempt, exc)
                    for stream, *_ in batch:
                        self._stop(stream)
                    return
                log.warning("posting chunks failed (%s); retrying", exc)
                self.backoff.wait()
            except ServerError as exc:   # the session itself was refused
                log.warning("chunks refused: %s", exc)
                for stream, *_ in batch:
                    self._stop(stream)
                return
        self.backoff.reset()
        self.posts += 1
        for (stream, entry, taken, done), result in zip(batch, results):
            self._settle(stream, taken, done, result, attempt)

    def _settle(self, stream, taken, done, result, attempt):
        error = result.get("error") if isinstance(result, dict) else None
        if error is None and isinstance(result, dict) and result.get("accepted"):
            with self._cond:
                if stream.gone.is_set():
                    return
                del stream.pending[:taken]
                stream.sent += taken
                stream.posts += 1
                # What came during the post came after it started: due no later than so.
                stream.since = (stream.taken_at if stream.pending or stream.end_done is not None
                                else None)
                if done:
                    self._forget(stream)
                    stream.finished.set()
                self._cond.notify_all()   # a reader waiting for room
            return
        status = error.get("status") if isinstance(error, dict) else None
        if status == 429:   # its client reads slowly: hold its chunks a moment
            if not stream.slowed:
                log.info("stream of task %s: its client reads slowly (429); holding it back",
                         stream.task_id)
            with self._cond:
                stream.slowed = True
                stream.retry_at = self.clock() + SLOW_CLIENT_PAUSE
            return
        if status == 409 and done and attempt > 1:  # our earlier attempt got through
            with self._cond:
                self._forget(stream)
                stream.finished.set()
            return
        log.info("stream of task %s stopped: %s", stream.task_id,
                 error.get("message") if isinstance(error, dict) else result)
        self._stop(stream)

    def _stop(self, stream):
        with self._cond:
            first = not stream.gone.is_set()
            stream.gone.set()
            stream.pending.clear()
            self._forget(stream)
            stream.finished.set()
            self._cond.notify_all()
        if first:
            stream.on_gone()

    def _forget(self, stream):
        """Called with the condition held."""
        if self._streams.get(stream.task_id) is stream:
            del self._streams[stream.task_id]


def _chunk(data: str) -> dict:
    """A chunk entry: its data, and its SSE event's name when it has one
    (an `Event`, publisher_client/backends.py)."""
    event = getattr(data, "event", None)
    return {"data": data, "event": event} if event else {"data": data}
