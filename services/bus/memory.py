"""The in-memory task bus: a waiter map for one worker process.

Its waits are `threading.Event.wait(timeout)`. Under `gunicorn -k gevent`
the worker monkey-patches `threading` before the app is imported, so every
wait is a cooperative gevent wait and thousands can be held at once; under
the threaded dev server and in tests they are ordinary thread waits.

Ownership: the client side owns each task entry from `submit` to `release`;
`release` removes it on every path (done, failed, expired, cancelled). The
publisher side only ever finds entries. A bounded, short-lived tombstone map
remembers finished ids so that late posts get 409/410 rather than 404.

Time moves a task only when someone looks: a waiting client (or a poll, or a
post) brings it up to date with `_advance` — expiry, redelivery of an
unacknowledged task, a lost publisher — and sleeps until the next such moment.
"""
import collections
import logging
import threading
import time

from services.bus import base
from services.bus.base import (CONNECTION_CHECK_INTERVAL, DONE_MARKER, MAX_TASKS_PER_POLL,
                               TOMBSTONE_TTL, Delivery, TaskBus, too_many_pending,
                               too_many_polls)
from services.bus.states import FINAL, OPEN, TRANSITIONS, TaskState
from services.errors import (BadGateway, Conflict, Forbidden, Gone, NotFound, TooManyRequests,
                             from_data)

log = logging.getLogger(__name__)

TOMBSTONE_MAX = 10_000
PRUNE_EVERY = 30.0


class _Task:
    __slots__ = ("id", "session_id", "owner", "kind", "llm", "payload", "share_key", "state",
                 "outcome", "error", "chunks", "received", "stream_done", "changed", "waiters",
                 "pickup_timeout", "pickup_deadline", "timeout", "finish_deadline",
                 "last_activity", "attempt", "delivered_at", "acked", "ack_required")

    def __init__(self, task_id, session_id, owner, payload, llm, share_key, pickup_timeout,
                 timeout, now):
        self.id = task_id
        self.session_id = session_id
        self.owner = owner
        self.kind = payload["kind"]
        self.llm = llm
        self.payload = payload
        self.share_key = share_key
        self.state = TaskState.QUEUED
        self.outcome = None
        self.error = None
        self.chunks = []
        self.received = 0
        self.stream_done = False
        self.changed = threading.Event()
        self.waiters = 1
        self.pickup_timeout = pickup_timeout
        self.pickup_deadline = now + pickup_timeout
        self.timeout = timeout
        self.finish_deadline = None
        self.last_activity = None
        self.attempt = 0          # deliveries so far
        self.delivered_at = None
        self.acked = False
        self.ack_required = False  # delivered to an acknowledging session

    def info(self):
        return {"task_id": self.id, "session_id": self.session_id, "owner": self.owner,
                "kind": self.kind, "llm": self.llm}


class _Session:
    __slots__ = ("queue", "wakeup", "polls_held", "last_seen", "signed", "acknowledging",
                 "dropped")

    def __init__(self, now):
        self.queue = collections.deque()  # task ids, and cancel messages (dicts)
        self.wakeup = threading.Event()
        self.polls_held = 0
        self.last_seen = now   # the last poll ended (or the session registered)
        self.signed = now      # the last sign of life: a poll, heartbeat, result or chunks
        self.acknowledging = False
        self.dropped = False


class MemoryTaskBus(TaskBus):
    def __init__(self, session_liveness=10.0, delivery: Delivery = Delivery(),
                 clock=time.monotonic):
        self.session_liveness = session_liveness
        self.delivery = delivery
        self.clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._sessions: dict[str, _Session] = {}
        self._shared: dict[str, str] = {}
        self._pending: collections.Counter = collections.Counter()
        self._tombstones: collections.OrderedDict = collections.OrderedDict()
        self._last_prune = clock()
        self._redeliveries = 0

    # -- client side -------------------------------------------------------

    def submit(self, session_id, task, *, llm, owner, limit, pickup_timeout, timeout,
               share_key=None, require_live=False):
        from models import new_id

        with self._lock:
            now = self.clock()
            if require_live:
                session = self._sessions.get(session_id)
                if session is None or not self._live(session, now):
                    raise base.publisher_offline(llm)
            if self._pending[llm] >= limit:
                raise too_many_pending(llm, limit)
            shared = self._tasks.get(self._shared.get(share_key)) if share_key else None
            if shared is not None:
                self._advance(shared, now)
            if shared is not None and shared.state not in FINAL:
                shared.waiters += 1
                self._pending[llm] += 1
                return shared.id
            task_id = new_id()
            t = _Task(task_id, session_id, owner, {"task_id": task_id, **task}, llm, share_key,
                      pickup_timeout, timeout, now)
            self._tasks[task_id] = t
            if share_key:
                self._shared[share_key] = task_id
            self._pending[llm] += 1
            session = self._session(session_id, now)
            session.queue.append(task_id)
            session.wakeup.set()
            return task_id

    def wait_result(self, task_id, poll_interval=None):
        t = self._tasks[task_id]
        end = None if poll_interval is None else self.clock() + poll_interval
        while True:
            with self._lock:
                now = self.clock()
                self._advance(t, now)
                if t.state == TaskState.DONE and t.outcome is not None:
                    return t.outcome
                if t.state == TaskState.DONE:  # chunks cannot finish a non-stream; never loop
                    raise BadGateway(f"The publisher of LLM '{t.llm}' sent no result",
                                     code="publisher_error")
                if t.state in FINAL:
                    raise from_data(t.error)
                t.changed.clear()
                wake_at = self._wake_at(t)
            if end is not None:
                if now >= end:
                    return None
                wake_at = min(wake_at, end)
            t.changed.wait(max(0.0, wake_at - now))

    def next_chunks(self, task_id, idle_timeout, poll_interval):
        t = self._tasks[task_id]
        end = self.clock() + poll_interval
        while True:
            with self._lock:
                now = self.clock()
                self._advance(t, now)
                if t.state == TaskState.PICKED and now - t.last_activity >= idle_timeout:
                    self._finish(t, TaskState.EXPIRED, base.stream_idle(t.llm, idle_timeout))
                if t.chunks or t.stream_done:
                    chunks, t.chunks = t.chunks, []
                    return chunks, t.stream_done, None
                if t.state == TaskState.DONE:
                    return [], True, t.outcome
                if t.state in FINAL:
                    raise from_data(t.error)
                t.changed.clear()
                wake_at = min(end, self._wake_at(t))
                if t.state == TaskState.PICKED:
                    wake_at = min(wake_at, t.last_activity + idle_timeout)
            if now >= end:
                return [], False, None
            t.changed.wait(max(0.0, wake_at - now))

    def release(self, task_id):
        with self._lock:
            t = self._tasks.get(task_id)
            if t is None:
                return
            t.waiters -= 1
            self._unpend(t.llm)
            if t.waiters > 0:
                return
            del self._tasks[task_id]
            if t.share_key and self._shared.get(t.share_key) == task_id:
                del self._shared[t.share_key]
            if t.state not in FINAL:
                self._finish(t, TaskState.CANCELLED, Gone("The client went away").to_data())
            self._tombstone(t)

    def acquire_slot(self, llm, limit):
        with self._lock:
            if self._pending[llm] >= limit:
                raise too_many_pending(llm, limit)
            self._pending[llm] += 1
        return llm

    def release_slot(self, slot):
        with self._lock:
            self._unpend(slot)

    # -- publisher side ----------------------------------------------------

    def poll(self, session_id, wait, connected=None, ack=None):
        with self._lock:
            now = self.clock()
            session = self._session(session_id, now)
            if session.polls_held >= self.delivery.max_polls:
                raise too_many_polls(session_id, self.delivery.max_polls)
            session.polls_held += 1
            session.signed = now
            if ack is not None:
                session.acknowledging = True
                for task_id in ack:
                    self._acknowledge(session_id, task_id, now)
        deadline = now + wait
        try:
            while True:
                with self._lock:
                    now = self.clock()
                    if session.queue and connected is not None and not connected():
                        return []
                    handed = self._hand_over(session, now) if session.queue else None
                    if handed:
                        return handed
                    if session.dropped:
                        return []
                    session.wakeup.clear()
                    self._maybe_prune(now)
                if now >= deadline:
                    return []
                if connected is None:
                    session.wakeup.wait(deadline - now)
                    continue
                # A poll whose publisher hung up is not held: look now and then.
                session.wakeup.wait(min(deadline - now, CONNECTION_CHECK_INTERVAL))
                if not connected():
                    return []
        finally:
            with self._lock:
                session.polls_held -= 1
                session.last_seen = session.signed = self.clock()

    def task_info(self, task_id, owner=None):
        with self._lock:
            return self._find_open(task_id, owner).info()

    def complete(self, task_id, outcome, owner=None, unless_kind=None):
        with self._lock:
            t = self._find_open(task_id, owner)
            self._signed(t)
            if t.kind == unless_kind:
                return t.info()
            t.outcome = outcome
            self._finish(t, TaskState.DONE, None)
            return None

    def push_chunks(self, task_id, chunks, seq, done, owner=None):
        with self._lock:
            t = self._tasks.get(task_id)
            self._find(task_id, owner)
            if t is not None:
                self._advance(t, self.clock())
            if (t is not None and seq is not None and seq + len(chunks) <= t.received
                    and (t.stream_done or not done)
                    and (t.state in OPEN or t.state == TaskState.DONE)):
                self._signed(t)
                return  # a retried batch we already have, even if the stream ended since
            t = self._find_open(task_id)
            if t.kind != "infer" or not t.payload.get("streaming"):
                raise Conflict(f"Task '{task_id}' is not a stream: post its result",
                               code="not_a_stream")
            start = t.received if seq is None else seq
            if start > t.received:
                raise Conflict(f"Chunk seq {seq} leaves a gap: expected {t.received}",
                               code="seq_gap", details={"expected_seq": t.received})
            if len(t.chunks) + len(chunks) > self.delivery.max_buffered_chunks:
                raise TooManyRequests("The client is not reading the stream fast enough",
                                      headers={"Retry-After": "1"})
            self._signed(t)
            for data in chunks[t.received - start:]:
                t.received += 1
                if data.strip() == DONE_MARKER:
                    t.stream_done = True
                    break
                t.chunks.append(data)
            if done:
                t.stream_done = True
            now = self.clock()
            if t.state == TaskState.QUEUED:  # answered without a poll: count it picked
                self._unqueue(t)
                self._pick(t, now)
            t.last_activity = now
            if t.stream_done:
                self._finish(t, TaskState.DONE, None)
            t.changed.set()

    def touch(self, session_id):
        with self._lock:
            now = self.clock()
            session = self._session(session_id, now)
            session.last_seen = session.signed = now

    def seen(self, session_id):
        with self._lock:
            self._session(session_id, self.clock()).signed = self.clock()

    def is_live(self, session_id):
        with self._lock:
            session = self._sessions.get(session_id)
            return session is not None and self._live(session, self.clock())

    def drop_session(self, session_id, reason):
        with self._lock:
            session = self._sessions.pop(session_id, None)
            failed = 0
            for t in self._tasks.values():
                if t.session_id == session_id and t.state not in FINAL:
                    self._finish(t, TaskState.FAILED, base.publisher_disconnected(t.llm, reason))
                    failed += 1
            if session is not None:
                session.dropped = True
                session.wakeup.set()
            return failed

    def gauges(self):
        with self._lock:
            now = self.clock()
            waiting, in_flight = collections.Counter(), collections.Counter()
            for t in self._tasks.values():
                if t.state == TaskState.QUEUED:
                    waiting[t.llm] += 1
                elif t.state == TaskState.PICKED:
                    in_flight[t.llm] += 1
            return {"tasks_waiting": dict(waiting), "tasks_in_flight": dict(in_flight),
                    "held_polls": sum(s.polls_held for s in self._sessions.values()),
                    "live_sessions": sum(1 for s in self._sessions.values()
                                         if self._live(s, now)),
                    "redeliveries": self._redeliveries}

    def stats(self):
        with self._lock:
            return {"tasks": len(self._tasks), "shared": len(self._shared),
                    "pending": sum(self._pending.values()),
                    "queued": sum(len(s.queue) for s in self._sessions.values()),
                    "polls": sum(s.polls_held for s in self._sessions.values()),
                    "sessions": len(self._sessions)}

    # -- internals (called with the lock held) -------------------------------

    def _session(self, session_id, now):
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session(now)
        return session

    def _live(self, session, now):
        return session.polls_held > 0 or now - session.last_seen < self.session_liveness

    def _unpend(self, llm):
        self._pending[llm] -= 1
        if self._pending[llm] <= 0:
            del self._pending[llm]

    def _hand_over(self, session, now):
        handed = []
        while session.queue and len(handed) < MAX_TASKS_PER_POLL:
            item = session.queue.popleft()
            if isinstance(item, dict):  # a cancel message
                handed.append(item)
                continue
            t = self._tasks.get(item)
            if t is None or t.state != TaskState.QUEUED:
                continue
            self._advance(t, now)
            if t.state == TaskState.QUEUED:
                self._pick(t, now)
                t.attempt += 1
                t.delivered_at = now
                t.acked = False
                t.ack_required = session.acknowledging
                handed.append({**t.payload, "attempt": t.attempt})
        return handed

    def _acknowledge(self, session_id, task_id, now):
        """The publisher has the task: it is never delivered again. Unknown,
        finished or another session's tasks are ignored."""
        t = self._tasks.get(task_id)
        if t is None or t.session_id != session_id or t.attempt == 0:
            return
        if t.state == TaskState.QUEUED:  # queued again for want of this ack: take it back
            self._unqueue(t)
            self._pick(t, now)
        if t.state == TaskState.PICKED:
            t.acked = True

    def _signed(self, t):
        """A post for the task: it is acknowledged, and its publisher alive."""
        t.acked = True
        session = self._sessions.get(t.session_id)
        if session is not None:
            session.signed = self.clock()

    def _pick(self, t, now):
        t.state = TaskState.PICKED
        if t.finish_deadline is None:  # redelivery keeps the first delivery's deadline
            t.finish_deadline = now + t.timeout
        t.last_activity = now
        t.changed.set()  # waiters move from the pickup deadline to the finish deadline

    def _unqueue(self, t):
        session = self._sessions.get(t.session_id)
        if session is not None:
            try:
                session.queue.remove(t.id)
            except ValueError:
                pass

    def _wake_at(self, t):
        """When time next moves the task (see `_advance`)."""
        wake_at = t.pickup_deadline if t.state == TaskState.QUEUED else t.finish_deadline
        if self._awaiting_ack(t):
            wake_at = min(wake_at, t.delivered_at + self.delivery.ack_timeout)
        session = self._sessions.get(t.session_id)
        if session is not None and session.polls_held == 0:
            wake_at = min(wake_at, session.signed + self.delivery.lost_timeout)
        return wake_at

    def _awaiting_ack(self, t):
        return t.state == TaskState.PICKED and t.ack_required and not t.acked

    def _advance(self, t, now):
        """Expire the task when a deadline passed; deliver it again when its
        acknowledgement is overdue; fail it when its publisher is lost."""
        if t.state == TaskState.QUEUED and now >= t.pickup_deadline:
            self._finish(t, TaskState.EXPIRED, base.not_picked_up(t.llm))
        elif t.state == TaskState.PICKED and now >= t.finish_deadline:
            self._finish(t, TaskState.EXPIRED, base.not_finished(t.llm))
        if self._awaiting_ack(t) and now >= t.delivered_at + self.delivery.ack_timeout:
            if t.attempt < self.delivery.max_attempts:
                self._requeue(t, now)
            else:
                self._finish(t, TaskState.EXPIRED, base.not_acknowledged(t.llm, t.attempt))
        session = self._sessions.get(t.session_id)
        if (t.state in OPEN and session is not None and session.polls_held == 0
                and now >= session.signed + self.delivery.lost_timeout):
            self._finish(t, TaskState.FAILED, base.publisher_lost(
                t.llm, self.delivery.lost_timeout))

    def _requeue(self, t, now):
        """Back to the head of its session's queue, with a fresh pickup deadline."""
        if TaskState.QUEUED not in TRANSITIONS[t.state]:
            return
        t.state = TaskState.QUEUED
        t.pickup_deadline = now + t.pickup_timeout
        session = self._session(t.session_id, now)
        session.queue.appendleft(t.id)
        session.wakeup.set()
        t.changed.set()
        self._redeliveries += 1
        log.info("task %s not acknowledged: delivering it again", t.id)

    def _finish(self, t, state, error):
        if state not in TRANSITIONS.get(t.state, ()):
            return
        was = t.state
        t.state = state
        t.error = error
        session = self._sessions.get(t.session_id)
        if session is not None:
            if was == TaskState.QUEUED:
                self._unqueue(t)
            elif was == TaskState.PICKED and state in (TaskState.CANCELLED, TaskState.EXPIRED):
                session.queue.append({"kind": "cancel", "task_id": t.id})
                session.wakeup.set()
        t.changed.set()

    def _find(self, task_id, owner=None):
        """The task's state. Raises NotFound, Forbidden (with `owner`: not its task)."""
        t = self._tasks.get(task_id)
        state, task_owner = (t.state, t.owner) if t is not None else self._tombstone_of(task_id)
        if state is None:
            raise NotFound(f"Task '{task_id}' not found", code="task_not_found")
        if owner is not None and owner != task_owner:
            raise Forbidden(f"Task '{task_id}' belongs to another publisher",
                            code="foreign_task")
        return state

    def _find_open(self, task_id, owner=None):
        self._find(task_id, owner)
        t = self._tasks.get(task_id)
        if t is not None:
            self._advance(t, self.clock())
        state = t.state if t is not None else self._tombstone_of(task_id)[0]
        if state == TaskState.DONE:
            raise Conflict(f"Task '{task_id}' is already completed", code="task_completed")
        if state in FINAL:
            raise Gone(f"Task '{task_id}' was {state}; stop working on it", code=f"task_{state}")
        return t

    def _tombstone(self, t):
        self._tombstones[t.id] = (t.state, t.owner, self.clock() + TOMBSTONE_TTL)
        self._tombstones.move_to_end(t.id)
        while len(self._tombstones) > TOMBSTONE_MAX:
            self._tombstones.popitem(last=False)

    def _tombstone_of(self, task_id):
        """(state, owner) of a finished task, or (None, None)."""
        entry = self._tombstones.get(task_id)
        if entry is None or entry[2] < self.clock():
            return None, None
        return entry[0], entry[1]

    def _maybe_prune(self, now):
        """Forget sessions that are neither live nor owed anything, and old tombstones."""
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        busy = {t.session_id for t in self._tasks.values()}
        for sid in [sid for sid, s in self._sessions.items()
                    if not self._live(s, now) and sid not in busy]:
            del self._sessions[sid]
        while self._tombstones:
            task_id, (_, _, expires) = next(iter(self._tombstones.items()))
            if expires >= now:
                break
            del self._tombstones[task_id]
