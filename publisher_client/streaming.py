"""Post a streamed answer's chunks to the server in batches.

The backend reader puts chunks in as they arrive; a sender thread takes the
first waiting chunk, gathers whatever else arrives within `linger` seconds
(or until the batch is full) and posts them as one batch. Chunks that arrive
while a post is in flight wait for the next one, so a fast backend needs a
handful of posts and a slow one adds at most `linger` to each token's latency.
"""
import logging
import queue
import threading
import time

from publisher_client.backoff import Backoff
from publisher_client.errors import ServerError, ServerUnavailable

log = logging.getLogger(__name__)

MAX_CHUNKS = 64
MAX_BYTES = 256 * 1024   # well under the server's 4 MiB body limit
LINGER = 0.02
MAX_ATTEMPTS = 8         # per batch, with backoff: about a minute of server trouble
MAX_QUEUED = 4 * MAX_CHUNKS  # then the backend reader waits: a slow client holds the backend back


class _End:
    def __init__(self, done: bool, last: str | None = None):
        self.done = done
        self.last = last


class ChunkStream:
    """`post(chunks, seq, done)` sends one batch; it may raise TaskGone (stop:
    the client is gone), ServerUnavailable (retried with the same seq, which
    the server deduplicates) or ServerError. `on_gone()` is called once
    when the stream has to stop early, to abort the backend request."""

    def __init__(self, post, on_gone=lambda: None, max_chunks=MAX_CHUNKS, max_bytes=MAX_BYTES,
                 linger=LINGER, backoff=None, max_attempts=MAX_ATTEMPTS, clock=time.monotonic):
        self.post = post
        self.on_gone = on_gone
        self.max_chunks = max_chunks
        self.max_bytes = max_bytes
        self.linger = linger
        self.backoff = backoff or Backoff(base=0.25, cap=10.0)
        self.max_attempts = max_attempts
        self.clock = clock
        self.sent = 0        # chunks the server accepted
        self.posts = 0       # batches posted (retries not counted)
        self.gone = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
        self._thread = threading.Thread(target=self._run, name="chunk-sender", daemon=True)
        self._thread.start()

    def put(self, data: str):
        """Queue a chunk; waits while the queue is full (the server holds us
        back), and drops it once the stream has stopped."""
        self._put(data)

    def _put(self, item):
        while not self.gone.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self, done: bool = True, last: str | None = None,
               timeout: float | None = None) -> bool:
        """Flush what is queued and wait for the sender. The last batch
        carries `done` and ends with `last` (the stream's "[DONE]": in the
        same post as `done`, a client never sees the end of a stream the
        server does not know has ended). Returns False when the stream
        stopped early (gone)."""
        self._put(_End(done, last))
        self._thread.join(timeout)
        return not self.gone.is_set()

    def cancel(self):
        """Drop what is queued and let the sender end; the backend is already stopping."""
        self.gone.set()
        try:
            self._queue.put_nowait(_End(False))
        except queue.Full:  # the sender sees `gone` after the batch in hand
            pass

    def _run(self):
        try:
            while True:
                batch, end = self._take_batch()
                if self.gone.is_set():   # cancelled meanwhile
                    return
                if batch or (end is not None and end.done):
                    self._post(batch, end is not None and end.done)
                if end is not None:
                    return
        except ServerError as exc:  # TaskGone (410, 404), 409, or the retries ran out
            log.info("stream stopped: %s", exc)
            self._stop()
        except Exception:  # never leave the backend streaming into the void
            log.exception("chunk sender failed")
            self._stop()

    def _take_batch(self) -> tuple[list[str], _End | None]:
        first = self._queue.get()
        if isinstance(first, _End):
            return ([first.last] if first.last is not None else []), first
        batch, size = [first], len(first)
        deadline = self.clock() + self.linger
        while len(batch) < self.max_chunks and size < self.max_bytes:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if isinstance(item, _End):
                if item.last is not None:
                    batch.append(item.last)
                return batch, item
            batch.append(item)
            size += len(item)
        return batch, None

    def _post(self, batch: list[str], done: bool):
        attempt = 0
        while True:
            attempt += 1
            try:
                self.post(batch, self.sent, done)
                break
            except ServerUnavailable as exc:
                if attempt >= self.max_attempts:
                    raise ServerError(f"giving up on the stream after {attempt} attempts: "
                                      f"{exc}") from None
                log.warning("posting chunks failed (%s); retrying", exc)
                self.backoff.wait()
            except ServerError as exc:
                # A retried final batch the server had already taken: done.
                if exc.status == 409 and done and attempt > 1:
                    break
                raise
        self.backoff.reset()
        self.sent += len(batch)
        self.posts += 1

    def _stop(self):
        if not self.gone.is_set():
            self.gone.set()
            self.on_gone()
