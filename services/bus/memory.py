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
from services.bus.base import (CONNECTION_CHECK_INTERVAL, DEFAULT_WEIGHT, DONE_MARKER,
                               MAX_TASKS_PER_POLL, TOMBSTONE_TTL, Delivery, Place, TaskBus,
                               queue_timeout, too_many_pending, too_many_polls,
                               too_many_queued)
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
                 "last_activity", "attempt", "delivered_at", "acked", "ack_required", "counted")

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
        self.counted = 1  # waiters counted against the LLM's pending limit
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


class _Entry:
    __slots__ = ("place", "changed", "arrival")

    def __init__(self, place, arrival):
        self.place = place
        self.changed = threading.Event()
        self.arrival = arrival


class _Queue:
    """A fair queue: each token's waiting entries in arrival order; the token
    served least recently goes first (one that was never served: in order of
    arrival), so tokens take turns and a heavy one cannot starve a light one."""

    __slots__ = ("waiting", "last_served", "seq", "members", "places")

    def __init__(self):
        self.places = 0  # entered and not yet left: waiting or granted
        self.waiting: dict[str, collections.deque[_Entry]] = {}
        self.last_served: dict[str, int] = {}
        self.seq = 0   # counts arrivals and grants: the order of events
        self.members: dict = {}

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def order(self) -> list[str]:
        """The waiting tokens, the next to be served first."""
        return sorted(self.waiting, key=lambda token: (
            self.last_served.get(token, 0), self.waiting[token][0].arrival))


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
        self._queues: dict[str, _Queue] = {}
        self._entries: dict[str, _Entry] = {}   # place entry id -> entry, until it leaves
        self._in_use: collections.Counter = collections.Counter()  # member -> turns granted
        self._turns: collections.Counter = collections.Counter()   # queue -> ties broken
        self._routes_version = 0

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
            if limit is not None and self._pending[llm] >= limit:
                raise too_many_pending(llm, limit)
            shared = self._tasks.get(self._shared.get(share_key)) if share_key else None
            if shared is not None:
                self._advance(shared, now)
            counted = limit is not None  # a request the scheduler admitted is counted there
            if shared is not None and shared.state not in FINAL:
                shared.waiters += 1
                shared.counted += counted
                self._pending[llm] += counted
                return shared.id
            task_id = new_id()
            t = _Task(task_id, session_id, owner, {"task_id": task_id, **task}, llm, share_key,
                      pickup_timeout, timeout, now)
            t.counted = int(counted)
            self._tasks[task_id] = t
            if share_key:
                self._shared[share_key] = task_id
            self._pending[llm] += counted
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
            if t.counted > 0:
                t.counted -= 1
                self._unpend(t.llm)
            if t.waiters > 0:
                return
            del self._tasks[task_id]
            if t.share_key and self._shared.get(t.share_key) == task_id:
                del self._shared[t.share_key]
            if t.state not in FINAL:
                self._finish(t, TaskState.CANCELLED, Gone("The client went away").to_data())
            self._tombstone(t)

    def acquire_slot(self, llm, limit, routes_version=None):
        with self._lock:
            if routes_version is not None and routes_version != str(self._routes_version):
                raise base.RoutesChanged()
            if self._pending[llm] >= limit:
                raise too_many_pending(llm, limit)
            self._pending[llm] += 1
        return llm

    def release_slot(self, slot):
        with self._lock:
            self._unpend(slot)

    # -- capacity and the fair queue ---------------------------------------

    def enter_queue(self, queue, token, members, *, limit, per_token, timeout):
        from models import new_id

        with self._lock:
            now = self.clock()
            q = self._queues.setdefault(queue, _Queue())
            if self._pending[queue] >= limit:
                raise too_many_queued(queue, limit, token=False)
            if len(q.waiting.get(token, ())) >= per_token:
                raise too_many_queued(queue, per_token, token=True)
            self._pending[queue] += 1
            q.places += 1
            q.members = {m.name: m for m in members}
            entry = _Entry(Place(queue, new_id(), token, timeout, now + timeout), q.tick())
            if not q.waiting and (member := self._choose(queue, q, now)) is not None:
                self._grant(q, entry, member)
            else:
                q.waiting.setdefault(token, collections.deque()).append(entry)
                entry.place.position = self._position(q, entry)
            self._entries[entry.place.entry] = entry
            return entry.place

    def wait_turn(self, place, poll_interval):
        entry = self._entries[place.entry]
        end = self.clock() + poll_interval
        while True:
            with self._lock:
                now = self.clock()
                if place.member is not None:
                    return True
                q = self._queues[place.queue]
                if now >= place.deadline:
                    self._unqueue_entry(q, entry)
                    raise queue_timeout(place.queue, place.timeout)
                self._dispatch(place.queue, now)  # capacity may have lapsed, not been released
                if place.member is not None:
                    return True
                place.position = self._position(q, entry)
                entry.changed.clear()
            if now >= end:
                return False
            entry.changed.wait(min(end, place.deadline) - now)

    def leave_queue(self, place):
        with self._lock:
            entry = self._entries.pop(place.entry, None)
            if entry is None:
                return
            self._unpend(place.queue)
            q = self._queues[place.queue]
            q.places -= 1
            if place.member is None:
                self._unqueue_entry(q, entry)
            else:
                self._in_use[place.member] -= 1
                if self._in_use[place.member] <= 0:
                    del self._in_use[place.member]
                now = self.clock()
                for name, other in list(self._queues.items()):  # every queue it serves
                    if place.member in other.members:
                        self._dispatch(name, now)
            if q.places == 0:  # nobody waits or runs: who was served last no longer matters
                del self._queues[place.queue]

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
            self._push(task_id, chunks, seq, done, owner)

    def push_chunks_batch(self, session_id, entries, owner=None):
        results = []
        with self._lock:
            for entry in entries:
                try:
                    self._push(entry["task_id"], entry["chunks"], entry.get("seq"),
                               entry.get("done", False), owner, session_id)
                except (NotFound, Forbidden, Conflict, Gone, TooManyRequests) as exc:
                    results.append(exc.to_data())
                else:
                    results.append(None)
        return results

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

    def routes_version(self):
        return str(self._routes_version)

    def routes_changed(self, later_if_unreachable=False):
        with self._lock:
            self._routes_version += 1

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
                    "places": len(self._entries), "queues": len(self._queues),
                    "in_use": sum(self._in_use.values()),
                    "sessions": len(self._sessions)}

    # -- internals (called with the lock held) -------------------------------

    def _session(self, session_id, now):
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session(now)
        return session

    def _live(self, session, now):
        return session.polls_held > 0 or now - session.last_seen < self.session_liveness

    def _choose(self, queue, q, now):
        """The live member with the most free capacity, in proportion to its
        declared capacity (DEFAULT_WEIGHT without one); ties in turn. None
        when every live member is full."""
        best, tied = None, []
        for member in q.members.values():
            used = self._in_use[member.name]
            if member.capacity is not None and used >= member.capacity:
                continue
            if member.session_id is not None:
                session = self._sessions.get(member.session_id)
                if session is None or not self._live(session, now):
                    continue
            load = used / (member.capacity or DEFAULT_WEIGHT)
            if best is None or load < best:
                best, tied = load, [member.name]
            elif load == best:
                tied.append(member.name)
        if not tied:
            return None
        self._turns[queue] += 1  # ties between equally free members are broken in turn
        return sorted(tied)[self._turns[queue] % len(tied)]

    def _grant(self, q, entry, member):
        entry.place.member = member
        entry.place.position = 0
        q.last_served[entry.place.token] = q.tick()
        self._in_use[member] += 1
        entry.changed.set()

    def _dispatch(self, queue, now):
        """Grant waiting entries while a member has room: the least recently
        served token first, in arrival order within a token."""
        q = self._queues.get(queue)
        while q is not None and q.waiting:
            token = q.order()[0]
            fifo = q.waiting[token]
            entry = fifo[0]
            if now >= entry.place.deadline:  # its waiter will say so; it waits no more
                self._unqueue_entry(q, entry)
                continue
            member = self._choose(queue, q, now)
            if member is None:
                return
            fifo.popleft()
            if not fifo:
                del q.waiting[token]
            self._grant(q, entry, member)

    def _unqueue_entry(self, q, entry):
        fifo = q.waiting.get(entry.place.token)
        if fifo is not None and entry in fifo:
            fifo.remove(entry)
            if not fifo:
                del q.waiting[entry.place.token]

    def _position(self, q, entry):
        """1 + the entries served before this one: tokens take turns, so every
        token ahead in turn serves up to k + 1 of its own first, every token
        behind up to k (k: this token's entries ahead of this one)."""
        tokens = q.order()
        mine = tokens.index(entry.place.token)
        k = list(q.waiting[entry.place.token]).index(entry)
        ahead = k + sum(min(len(q.waiting[t]), k + (1 if i < mine else 0))
                        for i, t in enumerate(tokens) if i != mine)
        return ahead + 1

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

    def _push(self, task_id, chunks, seq, done, owner=None, session_id=None):
        """push_chunks' rules; with `session_id`, a task of another session is Forbidden."""
        t = self._tasks.get(task_id)
        self._find(task_id, owner, session_id)
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

    def _find(self, task_id, owner=None, session_id=None):
        """The task's state. Raises NotFound, Forbidden (with `owner`: not its
        token's task; with `session_id`: not that session's)."""
        t = self._tasks.get(task_id)
        state, task_owner, task_session = ((t.state, t.owner, t.session_id) if t is not None
                                           else self._tombstone_of(task_id))
        if state is None:
            raise NotFound(f"Task '{task_id}' not found", code="task_not_found")
        if owner is not None and owner != task_owner:
            raise Forbidden(f"Task '{task_id}' belongs to another publisher",
                            code="foreign_task")
        if session_id is not None and session_id != task_session:
            raise Forbidden(f"Task '{task_id}' belongs to another session",
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
        self._tombstones[t.id] = (t.state, t.owner, t.session_id, self.clock() + TOMBSTONE_TTL)
        self._tombstones.move_to_end(t.id)
        while len(self._tombstones) > TOMBSTONE_MAX:
            self._tombstones.popitem(last=False)

    def _tombstone_of(self, task_id):
        """(state, owner, session) of a finished task, or (None, None, None)."""
        entry = self._tombstones.get(task_id)
        if entry is None or entry[3] < self.clock():
            return None, None, None
        return entry[:3]

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
            task_id, (*_, expires) = next(iter(self._tombstones.items()))
            if expires >= now:
                break
            del self._tombstones[task_id]
