"""A small map whose entries lapse: what a worker may remember for a moment
instead of asking the database on every request."""
import threading
import time

from cachetools import TTLCache


class TtlMap:
    """At most `maxsize` entries, each forgotten `ttl` seconds after it was
    put (the oldest go first when full). With a ttl of 0 it keeps nothing."""

    def __init__(self, ttl: float, maxsize: int = 10_000, timer=time.monotonic):
        self.ttl = float(ttl)
        self._entries = TTLCache(maxsize, self.ttl, timer) if self.ttl > 0 else None
        self._lock = threading.Lock()

    def get(self, key):
        if self._entries is None:
            return None
        with self._lock:
            return self._entries.get(key)

    def put(self, key, value) -> None:
        if self._entries is not None:
            with self._lock:
                self._entries[key] = value

    def discard(self, key) -> None:
        if self._entries is not None:
            with self._lock:
                self._entries.pop(key, None)

    def clear(self) -> None:
        if self._entries is not None:
            with self._lock:
                self._entries.clear()
