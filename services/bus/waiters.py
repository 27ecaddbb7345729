"""Local waiters: gevent-friendly events keyed by what they wait for.

A waiter registers *before* it reads the state it waits on, then clears its
event, reads, and waits: a notification that arrives in between is never
lost. Under `gunicorn -k gevent` `threading` is monkey-patched, so every wait
is a cooperative gevent wait; in tests they are plain thread waits.
"""
import contextlib
import threading


class Waiters:
    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}

    @contextlib.contextmanager
    def waiting(self, key: str):
        """An event set by every `notify(key)` while the block runs."""
        event = self.add(key)
        try:
            yield event
        finally:
            self.discard(key, event)

    def add(self, key: str) -> threading.Event:
        """A new event set by every `notify(key)` until `discard`."""
        event = threading.Event()
        with self._lock:
            self._events.setdefault(key, set()).add(event)
        return event

    def discard(self, key: str, event: threading.Event) -> None:
        with self._lock:
            events = self._events.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[key]

    def notify(self, key: str) -> None:
        with self._lock:
            events = list(self._events.get(key, ()))
        for event in events:
            event.set()

    def notify_all(self) -> None:
        """Wake everyone to look again (notifications may have been missed)."""
        with self._lock:
            events = [event for events in self._events.values() for event in events]
        for event in events:
            event.set()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._events.values())
