"""The last error answers the server gave (5xx, 413, 429), for the status page.

Bounded: the newest RECENT_ERRORS entries, nothing older. With the memory bus
(one worker process) they live in that process; with Redis, in one list that
every worker pushes to (LPUSH + LTRIM, with a TTL like every key), using the
bus's own connection pool. Recording never fails or slows a request by more
than one bounded Redis round trip: a Redis error drops the entry.
"""
import collections
import logging
import threading

import orjson

log = logging.getLogger(__name__)

RECENT_ERRORS = 50
TTL_SECONDS = 7 * 24 * 3600
MESSAGE_MAX = 300


class MemoryRecentErrors:
    """This process's last errors (the memory bus runs exactly one worker)."""

    def __init__(self, limit: int = RECENT_ERRORS):
        self._entries = collections.deque(maxlen=limit)
        self._lock = threading.Lock()

    def record(self, entry: dict) -> None:
        with self._lock:
            self._entries.appendleft(entry)

    def latest(self) -> list[dict]:
        """Newest first."""
        with self._lock:
            return list(self._entries)


class RedisRecentErrors:
    """The last errors of every worker and host, in one Redis list."""

    def __init__(self, client, key: str, limit: int = RECENT_ERRORS):
        self.client = client
        self.key = key
        self.limit = limit

    def record(self, entry: dict) -> None:
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self.key, orjson.dumps(entry))
            pipe.ltrim(self.key, 0, self.limit - 1)
            pipe.expire(self.key, TTL_SECONDS)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("recent error not recorded (%s)", type(exc).__name__)

    def latest(self) -> list[dict]:
        """Newest first; [] when Redis cannot be reached."""
        import redis

        try:
            raw = self.client.lrange(self.key, 0, self.limit - 1)
        except redis.RedisError as exc:
            log.warning("recent errors unavailable (%s)", type(exc).__name__)
            return []
        entries = []
        for item in raw:
            try:
                entries.append(orjson.loads(item))
            except orjson.JSONDecodeError:
                continue
        return entries


def for_bus(bus):
    """The store that fits the task bus: Redis beside a Redis bus, else memory."""
    client = getattr(bus, "client", None)
    if client is not None and hasattr(bus, "prefix"):
        return RedisRecentErrors(client, f"{bus.prefix}recent_errors")
    return MemoryRecentErrors()


def entry(*, at: str, status: int, code: str | None, message: str | None, method: str,
          path: str, request_id: str | None) -> dict:
    """One recorded error answer (its message shortened)."""
    return {"at": at, "status": status, "code": code, "message": (message or "")[:MESSAGE_MAX],
            "method": method, "path": path[:200], "request_id": request_id}
