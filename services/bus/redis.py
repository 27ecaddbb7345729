"""The Redis task bus: any worker on any host may hold a client's request while
any other holds the publisher's poll or takes its posts.

Its shape follows python-socketio's Redis manager and huey's / rq's storage:

- The state lives in Redis. Every state change is one Lua script (`lua/`),
  run atomically; the allowed moves are `TRANSITIONS`, rendered into the
  scripts from states.py. Deadlines are wall-clock times kept with the task;
  errors are kept as data, and each waiter raises its own exception.
- Each worker process holds one pub/sub connection, on a channel of its own.
  The scripts publish to the workers whose requests wait on a task (or whose
  polls wait on a session); a listener fans that out to local events
  (waiters.py). No Redis connection is held per waiting request. The end
  of a task not streamed comes with its answer, so a waiting request reads
  nothing; it lets go of the task after its answer went out, in a batch.
- What a worker contributes (a request waiting on a task or an LLM, a held
  poll) is a lease tied to the worker's liveness entry, which every script
  and a heartbeat renew. A worker killed with SIGKILL stops renewing it:
  within WORKER_TTL its leases stop counting, and its tasks end for the
  publisher (410 on its next post).
- Every key has a TTL; a finished task's key is its own tombstone.

Redis unreachable: every call raises Unavailable (`bus_unavailable`, 503
with Retry-After) within the socket timeouts, never hangs; releases that
could not reach Redis are retried by the heartbeat. Nothing connects before
the first call, so the server starts while Redis is down.
"""
import collections
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.connection import _HiredisParser

from jsonio import dumps, loads
from models import new_id
from services.bus.base import (CONNECTION_CHECK_INTERVAL, DEFAULT_WEIGHT, MAX_TASKS_PER_POLL,
                               TOMBSTONE_TTL, Delivery, Place, RoutesChanged, TaskBus,
                               publisher_offline, queue_timeout, too_many_pending,
                               too_many_polls, too_many_queued)
from services.bus.states import FINAL, TRANSITIONS, TaskState
from services import sockets
from services.bus.waiters import Waiters
from services.errors import BadGateway, GatewayTimeout, Unavailable, bus_unavailable, from_data

log = logging.getLogger(__name__)

WORKER_TTL = 10.0        # a worker that renewed nothing for this long is dead
HEARTBEAT_EVERY = 2.0
LEASE_TTL = 60.0         # an LLM's lease hash lives this long past its last renewal
ROUTES_TTL = 86400       # public LLMs' rows version (see routes_changed.lua)
MARGIN = 60.0            # a task's keys outlive its deadlines by this much
CLOCK_SLACK = 0.002      # wake just after a deadline, not just before it
LISTEN_TICK = 1.0
SILENCE_TIMEOUT = 10.0   # a listener that heard nothing (not even its heartbeat) reconnects
RECONNECT_BACKOFF = (0.1, 5.0)
MAX_RETRIED_RELEASES = 10_000
TIDY_BATCH = 100         # releases per script call
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# Waiting for a free pooled connection, as long as a command may take: a worker
# busy with thousands of polls ending at once holds its connections for
# seconds (each is given back when its greenlet runs again), and 2 s turned
# such a burst into 503s while Redis was well (python -m bench.held_polls --bus redis).
POOL_TIMEOUT = SOCKET_TIMEOUT
HEALTH_CHECK_INTERVAL = 10

# Redis could not be reached, or cannot serve now; anything else is a bug.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
UNSERVABLE_REPLIES = ("OOM", "MASTERDOWN", "READONLY", "LOADING", "BUSY", "NOREPLICAS")

LUA = Path(__file__).with_name("lua")
_KEEPALIVE = {option: value for option, value in (
    (getattr(socket, "TCP_KEEPIDLE", None), 30), (getattr(socket, "TCP_KEEPINTVL", None), 10),
    (getattr(socket, "TCP_KEEPCNT", None), 3)) if option is not None}


class _Parser(_HiredisParser):
    """redis-py asks a pooled connection `can_read()` before each command (a
    reply left unread means a broken connection). Under gevent that look
    went through the hub, a switch per command; now the kernel answers it."""

    def can_read(self, timeout=0):
        if (timeout == 0 and self._reader is not None and not self._reader.has_data()
                and self._sock is not None and not sockets.has_input(self._sock.fileno())):
            return False
        return super().can_read(timeout)


@dataclass(slots=True)
class _Hold:
    """A request of this process waiting on a task: its lease, and the event
    it listens on (registered before the task existed). `fresh_until`: the
    task was created here and not read yet; its first wait can sleep until
    then (when time first moves it, as the submit saw) or a notification,
    without a read."""

    lease: str
    llm: str
    changed: threading.Event
    fresh_until: float | None
    counted: bool = True  # against the LLM's pending limit (not when the fair queue counts it)
    # The task's end, as the news of it said (see the listener) or as the
    # observe that found it finished saw; a later wait reads the answer from
    # here. `released`: that observe also released the lease, in the same step.
    final: "_View | None" = None
    released: bool = False


@dataclass(frozen=True, slots=True)
class _View:
    """What a waiting client reads of its task."""

    state: str
    llm: str
    stream_done: bool
    outcome: dict | None
    error: dict | None
    wake_at: float  # when time next moves the task (a deadline, an ack overdue, ...)
    activity: float
    chunks: list[str]

    @classmethod
    def queued(cls, wake_at: float) -> "_View":
        return cls(state=TaskState.QUEUED, llm="", stream_done=False, outcome=None, error=None,
                   wake_at=wake_at, activity=0.0, chunks=[])


class RedisTaskBus(TaskBus):
    def __init__(self, client: redis.Redis, *, prefix="switchboard:", session_liveness=10.0,
                 delivery: Delivery = Delivery(), drop_memory=90.0, worker_ttl=WORKER_TTL,
                 silence_timeout=SILENCE_TIMEOUT, clock=time.time):
        self.client = client
        self.prefix = prefix
        self.session_liveness = session_liveness
        self.drop_memory = drop_memory  # how long a dropped session ends polls held at the drop
        self.clock = clock
        self.worker_id = None
        self.delivery = delivery
        self.worker_ttl = worker_ttl
        self.silence_timeout = silence_timeout
        self._scripts = _load_scripts(client, {
            "WORKER_TTL": worker_ttl, "SESSION_LIVENESS": session_liveness,
            "ACK_TIMEOUT": delivery.ack_timeout, "MAX_ATTEMPTS": delivery.max_attempts,
            "LOST_TIMEOUT": delivery.lost_timeout, "LOST_LABEL": f"{delivery.lost_timeout:g}",
            "MAX_POLLS": delivery.max_polls})
        self._waiters = Waiters()
        self._lock = threading.Lock()
        self._holds: dict[str, list[_Hold]] = {}             # task -> this process's requests
        self._leased = collections.Counter()  # lease hash key ("n:<llm>", "c:<member>") -> held here
        self._places: dict[str, threading.Event] = {}        # queue entry -> its waiter
        self._polls = collections.Counter()                  # session -> polls held here
        self._unreleased = collections.deque(maxlen=MAX_RETRIED_RELEASES)
        self._tidy_up = collections.deque(maxlen=MAX_RETRIED_RELEASES)  # (task, lease, llm)
        self._tidy_wanted = threading.Event()
        self._down = False
        self._pid = None
        self._start_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 64, socket_timeout=SOCKET_TIMEOUT,
                 **kwargs) -> "RedisTaskBus":
        """A bus on a bounded pool (waiting for a connection is bounded too). No
        automatic retries: a script whose reply was lost may have run."""
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=POOL_TIMEOUT,
            socket_timeout=socket_timeout, socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL, decode_responses=True,
            parser_class=_Parser,
            # Keep NATs and firewalls from forgetting idle connections.
            socket_keepalive=True, socket_keepalive_options=_KEEPALIVE)
        return cls(redis.Redis(connection_pool=pool), **kwargs)

    @classmethod
    def from_config(cls, config) -> "RedisTaskBus":
        return cls.from_url(config["REDIS_URL"],
                            max_connections=int(config["REDIS_MAX_CONNECTIONS"]),
                            prefix=config["REDIS_PREFIX"],
                            session_liveness=float(config["SESSION_LIVENESS"]),
                            delivery=Delivery.from_config(config),
                            drop_memory=float(config["POLL_WAIT_MAX"]) + MARGIN)

    # -- client side -------------------------------------------------------

    def submit(self, session_id, task, *, llm, owner, limit, pickup_timeout, timeout,
               share_key=None, require_live=False):
        task_id, lease = new_id(), new_id()
        payload = dumps({"task_id": task_id, **task}).decode()
        # Listen before the task exists: no notification of it can be missed, so
        # its first wait need not look first (see _Hold.fresh_until).
        changed = self._waiters.add("t:" + task_id)
        try:
            reply = self._run("submit", session_id, task_id, lease, llm, owner or "",
                              "" if limit is None else limit,
                              pickup_timeout, timeout, share_key or "", task["kind"],
                              _flag(task.get("streaming")), payload, _flag(require_live))
        except Unavailable:
            self._waiters.discard("t:" + task_id, changed)
            self._retry_later("release", task_id, lease, llm)  # it may have run
            raise
        if reply[0] != "ok":
            self._waiters.discard("t:" + task_id, changed)
            if reply[0] == "offline":
                raise publisher_offline(llm)
            raise too_many_pending(llm, limit)
        fresh_until = float(reply[2]) if len(reply) > 2 else None
        if reply[1] != task_id:  # joined a shared task: it may have moved already
            self._waiters.discard("t:" + task_id, changed)
            task_id, fresh_until = reply[1], None
            changed = self._waiters.add("t:" + task_id)
        counted = limit is not None
        with self._lock:
            self._holds.setdefault(task_id, []).append(
                _Hold(lease, llm, changed, fresh_until, counted))
            if counted:
                self._lease_held("n:" + llm)
        return task_id

    def wait_result(self, task_id, poll_interval=None):
        end = None if poll_interval is None else self.clock() + poll_interval
        hold = self._hold(task_id)
        changed, fresh_until = self._listen_to(task_id)
        while True:
            if hold.final is not None:
                view = hold.final
            elif fresh_until is not None:  # just queued here: nothing to read yet
                view, fresh_until = _View.queued(fresh_until), None
            else:
                changed.clear()
                # A finished task is released in the same step: the answer
                # goes out one Redis round trip sooner.
                view = self._observe(task_id, lease=hold.lease)
                if view.state in FINAL:
                    hold.released, hold.final = True, view
            if view.state == TaskState.DONE:
                if view.outcome is None:  # chunks cannot finish a non-stream; never loop
                    raise BadGateway(f"The publisher of LLM '{view.llm}' sent no result",
                                     code="publisher_error")
                return view.outcome
            if view.state in FINAL:
                raise from_data(view.error)
            now = self.clock()
            wake_at = view.wake_at
            if end is not None:
                if now >= end:
                    return None
                wake_at = min(wake_at, end)
            changed.wait(max(0.0, wake_at - now) + CLOCK_SLACK)

    def next_chunks(self, task_id, idle_timeout, poll_interval):
        end = self.clock() + poll_interval
        changed, fresh_until = self._listen_to(task_id)
        while True:
            if fresh_until is not None:
                view, fresh_until = _View.queued(fresh_until), None
            else:
                changed.clear()
                view = self._observe(task_id, idle_timeout, read_chunks=True)
            if view.chunks or view.stream_done:
                return view.chunks, view.stream_done, None
            if view.state == TaskState.DONE:
                return [], True, view.outcome
            if view.state in FINAL:
                raise from_data(view.error)
            now = self.clock()
            if now >= end:
                return [], False, None
            wake_at = min(end, view.wake_at)
            if view.state == TaskState.PICKED:
                wake_at = min(wake_at, view.activity + idle_timeout)
            changed.wait(max(0.0, wake_at - now) + CLOCK_SLACK)

    def release(self, task_id):
        with self._lock:
            holds = self._holds.get(task_id)
            if not holds:
                return
            # A hold released already (by the observe that found the task
            # finished) goes first: each request frees one lease, and those of
            # requests still waiting keep the answer in Redis for them.
            done = next((i for i, hold in enumerate(holds) if hold.final is not None), -1)
            hold = holds.pop(done)
            if done == 0 and holds:  # the others listen on the first hold's event: keep it
                holds[0].changed, hold.changed = hold.changed, holds[0].changed
            if not holds:
                del self._holds[task_id]
            if hold.counted:
                self._lease_freed("n:" + hold.llm)
        self._waiters.discard("t:" + task_id, hold.changed)
        if hold.released:
            return
        if hold.final is not None:  # ended: let go once the answer went out, with others
            self._tidy_up.append((task_id, hold.lease, hold.llm))
            self._tidy_wanted.set()
        else:
            self._run_or_retry("release", task_id, hold.lease, hold.llm)

    def acquire_slot(self, llm, limit, routes_version=None):
        lease = new_id()
        try:
            taken = self._run("acquire_slot", llm, lease, limit, LEASE_TTL, routes_version or "")
        except Unavailable:
            self._retry_later("release_slot", llm, lease)
            raise
        if taken == -1:
            raise RoutesChanged()
        if not taken:
            raise too_many_pending(llm, limit)
        with self._lock:
            self._lease_held("n:" + llm)
        return llm, lease

    def release_slot(self, slot):
        llm, lease = slot
        with self._lock:
            self._lease_freed("n:" + llm)
        self._run_or_retry("release_slot", llm, lease)

    # -- capacity and the fair queue ---------------------------------------

    def enter_queue(self, queue, token, members, *, limit, per_token, timeout):
        entry = new_id()
        changed = self._waiters.add("q:" + entry)  # listening before it can be granted
        # None is left out: Lua's cjson reads null as a value that is not nil.
        members_json = dumps([{key: value for key, value in (
            ("n", m.name), ("c", m.capacity), ("s", m.session_id)) if value is not None}
            for m in members]).decode()
        try:
            reply = self._run("queue_enter", queue, token, entry, members_json, limit, per_token,
                              timeout)
        except Unavailable:
            self._waiters.discard("q:" + entry, changed)
            self._retry_later("queue_leave", queue, token, entry)  # it may have run
            raise
        if reply[0] in ("full", "token_full"):
            self._waiters.discard("q:" + entry, changed)
            raise too_many_queued(queue, per_token if reply[0] == "token_full" else limit,
                                  token=reply[0] == "token_full")
        place = Place(queue, entry, token, timeout, self.clock() + timeout)
        with self._lock:
            self._places[entry] = changed
            self._lease_held("n:" + queue)
        self._take_reply(place, reply)
        return place

    def wait_turn(self, place, poll_interval):
        end = self.clock() + poll_interval
        changed = self._places[place.entry]
        while place.member is None:
            changed.clear()
            self._take_reply(place, self._run("queue_wait", place.queue, place.token,
                                              place.entry))
            if place.member is not None:
                break
            now = self.clock()
            if now >= end:
                return False
            changed.wait(max(0.0, min(end, place.deadline) - now) + CLOCK_SLACK)
        return True

    def leave_queue(self, place):
        with self._lock:
            changed = self._places.pop(place.entry, None)
            if changed is None:
                return
            self._lease_freed("n:" + place.queue)
            if place.member is not None:
                self._lease_freed("c:" + place.member)
        self._waiters.discard("q:" + place.entry, changed)
        self._run_or_retry("queue_leave", place.queue, place.token, place.entry)

    def _take_reply(self, place, reply):
        if reply[0] == "granted":
            place.member, place.position = reply[1], 0
            with self._lock:
                self._lease_held("c:" + place.member)
        elif reply[0] == "queued":
            place.position = int(reply[1])
        else:  # timeout: its entry is gone
            raise queue_timeout(place.queue, place.timeout)

    # -- publisher side ----------------------------------------------------

    def poll(self, session_id, wait, connected=None, ack=None):
        started = self.clock()
        deadline = started + wait
        held = (session_id, MAX_TASKS_PER_POLL, started, new_id())  # the last: its lease
        with self._waiters.waiting("s:" + session_id) as changed:
            if connected is not None and not connected():
                return []
            reply = self._run("poll", *held, _flag(ack is not None), wait, *(ack or ()))
            if reply[0] == "full":
                raise too_many_polls(session_id, self.delivery.max_polls)
            with self._lock:
                self._polls[session_id] += 1
            try:
                while True:
                    if reply[0] == "dropped":
                        return []
                    if reply[0] == "ended":  # tasks handed over; the script ended the poll
                        return [loads(item) for item in reply[1:]]
                    now = self.clock()
                    if now >= deadline:
                        return []
                    # A poll whose publisher hung up is not held: look now and then.
                    changed.wait(deadline - now if connected is None
                                 else min(deadline - now, CONNECTION_CHECK_INTERVAL))
                    changed.clear()
                    if connected is not None and not connected():
                        return []
                    reply = self._run("poll", *held, "0", wait)
            finally:
                with self._lock:
                    self._polls[session_id] -= 1
                    if self._polls[session_id] <= 0:
                        del self._polls[session_id]
                if reply[0] != "ended":
                    try:
                        self._run("poll_end", session_id, held[-1], started)
                    except Unavailable:
                        pass  # its lease lapses with this worker's, or with the key

    def task_info(self, task_id, owner=None):
        _, session_id, task_owner, kind, llm = self._answer(self._run("task_info", task_id,
                                                                      owner or ""))
        return {"task_id": task_id, "session_id": session_id, "owner": task_owner or None,
                "kind": kind, "llm": llm}

    def complete(self, task_id, outcome, owner=None, unless_kind=None):
        reply = self._answer(self._run("complete", task_id, owner or "",
                                       dumps(outcome).decode(), unless_kind or ""))
        if reply[0] != "left":
            return None
        _, session_id, task_owner, kind, llm = reply
        return {"task_id": task_id, "session_id": session_id, "owner": task_owner or None,
                "kind": kind, "llm": llm}

    def push_chunks(self, task_id, chunks, seq, done, owner=None):
        self._answer(self._run("push_chunks", task_id, owner or "", "" if seq is None else seq,
                               _flag(done), self.delivery.max_buffered_chunks, *chunks))

    def push_chunks_batch(self, session_id, entries, owner=None):
        if not entries:
            return []
        args = [session_id, owner or "", self.delivery.max_buffered_chunks]
        for entry in entries:
            seq = entry.get("seq")
            args += [entry["task_id"], "" if seq is None else seq, _flag(entry.get("done")),
                     len(entry["chunks"]), *entry["chunks"]]
        return [loads(error) if error else None
                for error in self._run("push_chunks_batch", *args)]

    def touch(self, session_id):
        self._run("touch", session_id)

    def seen(self, session_id):
        self._run("seen", session_id)

    def is_live(self, session_id):
        return bool(self._run("is_live", session_id))

    def drop_session(self, session_id, reason):
        return int(self._run("drop", session_id, reason, self.drop_memory))

    # -- public LLMs' rows version (services/routes.py) ---------------------

    def routes_version(self):
        return self._run("routes_version")

    def routes_changed(self, later_if_unreachable=False):
        if later_if_unreachable:
            self._run_or_retry("routes_changed", ROUTES_TTL)
        else:
            self._run("routes_changed", ROUTES_TTL)

    # -- operations --------------------------------------------------------

    def gauges(self):
        held, live, redeliveries, *per_llm = self._run("gauges")
        waiting, in_flight = {}, {}
        for i in range(0, len(per_llm), 3):
            llm, queued, picked = per_llm[i], int(per_llm[i + 1]), int(per_llm[i + 2])
            if queued:
                waiting[llm] = queued
            if picked:
                in_flight[llm] = picked
        return {"tasks_waiting": waiting, "tasks_in_flight": in_flight,
                "held_polls": int(held), "live_sessions": int(live),
                "redeliveries": int(redeliveries)}

    def ping(self):
        try:
            self.client.ping()
        except UNREACHABLE:
            raise bus_unavailable() from None

    def close(self):
        self._stopping.set()
        self._tidy_wanted.set()
        if self._threads:
            try:  # wake the listener now rather than at its next tick
                self.client.publish(self._channel(), "stop")
            except redis.RedisError:
                pass
        for thread in self._threads:
            thread.join(LISTEN_TICK + SOCKET_TIMEOUT)
        if self._threads:
            self._tidy_now()
        self._threads = []
        self._pid = None
        self.client.connection_pool.disconnect()

    def stats(self):
        with self._lock:
            return {"tasks": len(self._holds), "shared": 0,
                    "pending": sum(n for key, n in self._leased.items()
                                   if key.startswith("n:")),
                    "in_use": sum(n for key, n in self._leased.items() if key.startswith("c:")),
                    "places": len(self._places),
                    "polls": sum(self._polls.values()), "waiters": len(self._waiters),
                    "queued": self._queued()}

    # -- internals -----------------------------------------------------------

    def _run(self, script, *args):
        """Run a script as this worker, now. Raises Unavailable when Redis
        cannot be reached or cannot serve."""
        self._ensure_started()
        try:
            reply = self._scripts[script](
                args=(self.prefix, f"{self.clock():.6f}", self.worker_id, *args))
        except redis.RedisError as exc:
            if not _unavailable(exc):
                raise
            if not self._down:
                self._down = True
                log.warning("task bus: Redis unavailable (%s: %s)", type(exc).__name__, exc)
            raise bus_unavailable() from None
        if self._down:
            self._down = False
            log.info("task bus: Redis reachable again")
        return reply

    def _run_or_retry(self, script, *args):
        try:
            self._run(script, *args)
        except Unavailable:
            self._retry_later(script, *args)

    def _retry_later(self, script, *args):
        self._unreleased.append((script, args))

    def _retry_releases(self):
        while self._unreleased:
            script, args = self._unreleased.popleft()
            try:
                self._run(script, *args)
            except Unavailable:
                self._unreleased.appendleft((script, args))
                return

    def _answer(self, reply):
        if reply[0] == "err":
            raise from_data(loads(reply[1]))
        return reply

    def _observe(self, task_id, idle_timeout=None, read_chunks=False, lease="") -> _View:
        reply = self._run("observe", task_id, "" if idle_timeout is None else idle_timeout,
                          "" if idle_timeout is None else f"{idle_timeout:g}",
                          _flag(read_chunks), lease)
        if reply[0] == "missing":  # its keys lapsed: only if nothing read it for minutes
            raise GatewayTimeout(f"Task '{task_id}' expired", code="task_timeout")
        state, done, outcome, error, wake_at, activity, llm, *chunks = reply
        return _View(state=state, llm=llm, stream_done=done == "1",
                     outcome=loads(outcome) if outcome else None,
                     error=loads(error) if error else None,
                     wake_at=float(wake_at) if wake_at else 0.0,
                     activity=float(activity) if activity else 0.0, chunks=chunks)

    def _hold(self, task_id) -> _Hold:
        """The hold a wait of this process reads through: one whose task was
        found finished (its answer is here), else the first."""
        with self._lock:
            holds = self._holds[task_id]
            return next((hold for hold in holds if hold.final is not None), holds[0])

    def _listen_to(self, task_id):
        """(the event this process's request listens on, fresh_until) for a
        task it submitted; a first wait takes the fresh mark."""
        with self._lock:
            hold = self._holds[task_id][0]
            fresh_until, hold.fresh_until = hold.fresh_until, None
        return hold.changed, fresh_until

    def _channel(self) -> str:
        return f"{self.prefix}w:{self.worker_id}"

    def _lease_held(self, key):
        self._leased[key] += 1

    def _lease_freed(self, key):
        self._leased[key] -= 1
        if self._leased[key] <= 0:
            del self._leased[key]

    def _queued(self) -> int:
        """Task ids and cancel messages queued for any session (tests only: a SCAN)."""
        try:
            return sum(self.client.llen(key)
                       for key in self.client.scan_iter(match=self.prefix + "q:*", count=1000))
        except UNREACHABLE:
            return 0

    def _ensure_started(self):
        """The listener and the heartbeat run in every process that uses the bus
        (started lazily, so a forked worker starts its own)."""
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
            self._stopping = threading.Event()
            self._threads = [threading.Thread(target=target, name=f"bus-{target.__name__}",
                                              daemon=True)
                             for target in (self._listen, self._beat, self._tidy)]
            self._pid = os.getpid()
            for thread in self._threads:
                thread.start()

    def _listen(self):
        """Fan this worker's channel out to local waiters; resubscribe after an
        outage and wake everyone to look again (messages sent meanwhile are lost).
        The heartbeat publishes to the channel too: a connection that hears
        nothing for `silence_timeout` is dead however quiet the socket is."""
        channel = self._channel()
        backoff = RECONNECT_BACKOFF[0]
        while not self._stopping.is_set():
            pubsub = self.client.pubsub()
            heard = time.monotonic()
            try:
                pubsub.subscribe(channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=LISTEN_TICK)
                    if message is None:
                        if time.monotonic() - heard > self.silence_timeout:
                            raise redis.ConnectionError("the pub/sub connection went silent")
                        continue
                    heard = time.monotonic()
                    if message["type"] == "message":
                        self._hear(message["data"])
                    elif message["type"] == "subscribe":
                        backoff = RECONNECT_BACKOFF[0]
                        self._waiters.notify_all()
            except redis.RedisError as exc:
                if not _unavailable(exc):
                    log.exception("task bus listener failed")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF[1])
            finally:
                try:
                    pubsub.close()
                except redis.RedisError:
                    pass

    def _hear(self, message: str):
        """Wake the waiters of what changed. The end of a task not streamed
        comes with its answer, which its requests here take as theirs."""
        if message.startswith("f:"):
            task_id, state, llm, error, outcome = message[2:].split("\n", 4)
            view = _View(state=state, llm=llm, stream_done=False,
                         outcome=loads(outcome) if outcome else None,
                         error=loads(error) if error else None,
                         wake_at=0.0, activity=0.0, chunks=[])
            with self._lock:
                for hold in self._holds.get(task_id, ()):
                    if hold.final is None:
                        hold.final = view
            message = "t:" + task_id
        self._waiters.notify(message)

    def _tidy(self):
        """Let go of ended tasks (see `release`) after their answers went out,
        many in one script call."""
        while not self._stopping.is_set():
            self._tidy_wanted.wait(LISTEN_TICK)
            self._tidy_wanted.clear()
            try:
                self._tidy_now()
            except Exception:  # keep tidying whatever happens
                log.exception("task bus tidy-up failed")

    def _tidy_now(self):
        while self._tidy_up:
            batch = []
            with contextlib.suppress(IndexError):
                while len(batch) < TIDY_BATCH:
                    batch.append(self._tidy_up.popleft())
            try:
                self._run("release_many", *itertools.chain.from_iterable(batch))
            except Unavailable:
                for item in batch:
                    self._retry_later("release", *item)
                return

    def _beat(self):
        """Keep this worker alive and its lease hashes with it; retry releases."""
        while not self._stopping.wait(min(HEARTBEAT_EVERY, self.worker_ttl / 4)):
            with self._lock:
                keys = list(self._leased)
            try:
                self._run("heartbeat", LEASE_TTL, *keys)
                self._retry_releases()
            except Unavailable:
                pass
            except Exception:  # keep beating whatever happens
                log.exception("task bus heartbeat failed")


def _flag(value) -> str:
    return "1" if value else "0"


def _unavailable(exc: redis.RedisError) -> bool:
    return isinstance(exc, UNREACHABLE) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(UNSERVABLE_REPLIES))


def _load_scripts(client, constants: dict) -> dict:
    """Every script of lua/, each behind the shared prelude (with `constants`
    written in), as redis-py Script objects (EVALSHA, loading the script again
    when Redis has forgotten it)."""
    prelude = (LUA / "prelude.lua").read_text()
    for name, value in {"TRANSITIONS": _lua_transitions(), "MARGIN": MARGIN,
                        "TOMBSTONE_MS": int(TOMBSTONE_TTL * 1000), "LEASE_TTL": LEASE_TTL,
                        "DEFAULT_WEIGHT": DEFAULT_WEIGHT, **constants}.items():
        prelude = prelude.replace("{{" + name + "}}", str(value))
    if "{{" in prelude:
        raise RuntimeError("a constant of lua/prelude.lua has no value")
    return {path.stem: client.register_script(prelude + path.read_text())
            for path in sorted(LUA.glob("*.lua")) if path.stem != "prelude"}


def _lua_transitions() -> str:
    """TRANSITIONS as a Lua table: {queued = {picked = true, ...}, ...}."""
    rows = (f"{state} = {{{', '.join(f'{to} = true' for to in sorted(targets))}}}"
            for state, targets in TRANSITIONS.items())
    return "{" + ", ".join(rows) + "}"
