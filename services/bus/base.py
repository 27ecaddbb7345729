"""The task bus interface: how a client's request reaches a publisher and back.

One small interface, two sides:

- the client side submits a task for a publisher session, then waits for its
  outcome (`wait_result`) or reads its chunks (`next_chunks`), and always
  releases it (`release`, or use `open_task` as a context manager); a call to
  a public LLM holds a slot (`acquire_slot` / `release_slot`) so that
  MAX_PENDING_PER_LLM counts it too;
- the publisher side long-polls its session (`poll`), posts an outcome
  (`complete`) or chunks (`push_chunks`, or `push_chunks_batch` for many
  streams of a session at once), and disconnects (`drop_session`).

Tasks, outcomes, chunks and errors are plain JSON-able data: each waiter
raises an exception of its own, built from the stored error. The in-memory
bus is for a single worker process only (like python-socketio's in-memory
manager); the Redis bus spans workers and hosts.
"""
import abc
import contextlib
from dataclasses import dataclass

from services.errors import BadGateway, GatewayTimeout, TooManyRequests, Unavailable

MAX_TASKS_PER_POLL = 64
MAX_ACKS_PER_POLL = 64
CONNECTION_CHECK_INTERVAL = 2.0  # a held poll looks this often whether its publisher hung up
TOMBSTONE_TTL = 600.0         # a finished task is remembered this long (late posts: 409/410)
DONE_MARKER = "[DONE]"


@dataclass(frozen=True)
class Delivery:
    """How tasks reach publishers (DESIGN.md, "Delivery"): an acknowledging
    session's task not acknowledged within `ack_timeout` is delivered again, up
    to `max_attempts` deliveries; a session with no sign of life for
    `lost_timeout` is lost; at most `max_polls` polls of a session are held;
    a stream whose client has `max_buffered_chunks` unread holds its publisher
    back (429)."""

    ack_timeout: float = 10.0
    max_attempts: int = 2
    lost_timeout: float = 60.0
    max_polls: int = 4
    max_buffered_chunks: int = 10_000

    @classmethod
    def from_config(cls, config) -> "Delivery":
        return cls(ack_timeout=float(config["TASK_ACK_TIMEOUT"]),
                   max_attempts=int(config["TASK_MAX_ATTEMPTS"]),
                   lost_timeout=float(config["PUBLISHER_LOST_TIMEOUT"]),
                   max_polls=int(config["MAX_POLLS_PER_SESSION"]),
                   max_buffered_chunks=int(config["MAX_BUFFERED_CHUNKS"]))


@dataclass(frozen=True)
class Member:
    """A row a queue may hand requests to: its name, its declared capacity
    (None: no server-side cap, weighed as DEFAULT_WEIGHT when choosing) and,
    for a virtual row, its publisher session (skipped while not live)."""

    name: str
    capacity: int | None = None
    session_id: str | None = None


DEFAULT_WEIGHT = 4  # a member without max_concurrency, when free capacity is compared


@dataclass
class Place:
    """A request's place in a fair queue (`enter_queue`): `member` is set once
    a member's capacity is granted to it; `position` (1: next) while it waits."""

    queue: str
    entry: str
    token: str
    timeout: float
    deadline: float
    member: str | None = None
    position: int = 0


class TaskBus(abc.ABC):
    """See the module docstring. Every wait takes a timeout; nothing waits forever.
    Any method may raise Unavailable (`bus_unavailable`) when the bus itself
    cannot be reached."""

    # -- client side -------------------------------------------------------

    @abc.abstractmethod
    def submit(self, session_id: str, task: dict, *, llm: str, owner: str | None, limit: int,
               pickup_timeout: float, timeout: float, share_key: str | None = None,
               require_live: bool = False) -> str:
        """Queue `task` (a dict with `kind`, no `task_id`) for the session and
        return its task id. `owner` is the token that owns the session: only it
        may answer the task. With `share_key`, a task with the same key still in
        flight is joined instead (its waiters share one outcome). `limit` caps
        the requests waiting on `llm` (slots included): past it, TooManyRequests.
        With `require_live`, a session that is not live (`is_live`) is
        Unavailable (`publisher_offline`). The task expires unless picked up
        within `pickup_timeout` and finished within `timeout` of pickup."""

    @abc.abstractmethod
    def wait_result(self, task_id: str, poll_interval: float | None = None) -> dict | None:
        """Block until the task's outcome: `{status, body}` or `{error}` as the
        publisher posted it. Returns None when `poll_interval` passes first (so
        a streaming caller can send a keep-alive). Raises GatewayTimeout when
        the task expired, Unavailable when the publisher disconnected."""

    @abc.abstractmethod
    def next_chunks(self, task_id: str, idle_timeout: float,
                    poll_interval: float) -> tuple[list[str], bool, dict | None]:
        """Wait up to `poll_interval` for stream data. Returns (chunks, done,
        outcome): new chunk payloads in order, whether the stream ended, and an
        outcome when the publisher answered with a result instead of chunks.
        Raises GatewayTimeout when nothing arrived for `idle_timeout` (or the
        task was never picked up), Unavailable when the publisher disconnected."""

    @abc.abstractmethod
    def release(self, task_id: str) -> None:
        """The caller is done with the task. The last waiter to release an
        unfinished task cancels it: the publisher's next poll carries a
        `cancel` task and its next post for it gets 410. Never raises."""

    @contextlib.contextmanager
    def open_task(self, session_id: str, task: dict, **kwargs):
        """`submit`, then `release` however the block ends."""
        task_id = self.submit(session_id, task, **kwargs)
        try:
            yield task_id
        finally:
            self.release(task_id)

    @abc.abstractmethod
    def acquire_slot(self, llm: str, limit: int, routes_version: str | None = None) -> object:
        """Count one more request in flight at `llm` (a public LLM's upstream
        call), within `limit` across every worker: past it, TooManyRequests.
        Returns the slot to hand to `release_slot`. With `routes_version`
        (see `routes_version`): only if no public LLM's row has changed since;
        else RoutesChanged, and nothing is counted."""

    @abc.abstractmethod
    def release_slot(self, slot: object) -> None:
        """Free a slot from `acquire_slot`. Never raises."""

    # -- capacity and the fair queue (DESIGN.md, "Pools ...") --------------------

    @abc.abstractmethod
    def enter_queue(self, queue: str, token: str, members: list[Member], *, limit: int,
                    per_token: int, timeout: float) -> Place:
        """Ask for a turn on one of `members` (an LLM's queue, named after it,
        or a pool's, `pool:<model>`). The turn is granted at once when nobody
        waits and a live member has free capacity (the one with the most, in
        proportion; ties in turn); else the request waits, served round-robin
        across tokens and in arrival order within one. The place counts
        against `limit` (requests waiting on or in flight at the queue) and
        against `per_token` (this token's waiting requests): past either,
        TooManyRequests. Always `leave_queue` it."""

    @abc.abstractmethod
    def wait_turn(self, place: Place, poll_interval: float) -> bool:
        """Wait up to `poll_interval` for the turn: True once granted
        (`place.member` is set), else False (`place.position` is fresh).
        Raises Unavailable (`queue_timeout`, Retry-After) after the place's
        `timeout`."""

    @abc.abstractmethod
    def leave_queue(self, place: Place) -> None:
        """The request is done, or gives up its place: its queue entry, its
        member's capacity and its count against the limit are free again,
        and the next waiting request gets them. Never raises."""

    # -- publisher side ----------------------------------------------------

    @abc.abstractmethod
    def poll(self, session_id: str, wait: float, connected=None,
             ack: list[str] | None = None) -> list[dict]:
        """Hand over the session's queued tasks (at most MAX_TASKS_PER_POLL),
        each with its `attempt`, waiting up to `wait` seconds for the first
        one. Marks the session live while held. `connected()`, when given, is
        asked before a hand-over and every CONNECTION_CHECK_INTERVAL: a poll
        whose publisher has hung up returns [] and leaves the tasks queued.
        `ack` (even empty) makes the session acknowledging and acknowledges
        the tasks it names (unknown, finished or foreign ids are ignored).
        Raises TooManyRequests when the session already holds
        `Delivery.max_polls` polls."""

    @abc.abstractmethod
    def task_info(self, task_id: str, owner: str | None = None) -> dict:
        """`{task_id, session_id, owner, kind, llm}` of a task a publisher may
        answer. Raises NotFound (unknown), Forbidden (with `owner`: another
        token's task, finished or not), Conflict (already completed), Gone
        (cancelled, expired, failed, or the client's worker is gone)."""

    @abc.abstractmethod
    def complete(self, task_id: str, outcome: dict, owner: str | None = None,
                 unless_kind: str | None = None) -> dict | None:
        """Post the outcome (`{status, body}` or `{error}`) and return None.
        With `unless_kind`, a task of that kind is left open and its
        `task_info` returned instead: the caller does what must come first (a
        wake's row goes active), then completes it. Raises like `task_info`."""

    @abc.abstractmethod
    def push_chunks(self, task_id: str, chunks: list[str], seq: int | None,
                    done: bool, owner: str | None = None) -> None:
        """Append stream chunks. With `seq` (index of the first chunk in the
        stream), chunks already received are dropped, and a batch that only
        repeats them is accepted even after the stream ended. A `[DONE]`
        payload or `done` ends the stream. Raises like `task_info`, and
        Conflict when `seq` leaves a gap or the task is not a streamed infer,
        TooManyRequests when the client reads too slowly."""

    @abc.abstractmethod
    def push_chunks_batch(self, session_id: str, entries: list[dict],
                          owner: str | None = None) -> list[dict | None]:
        """`push_chunks` for many tasks of one session at once (one Redis round
        trip): each entry is `{task_id, chunks, seq, done}` as push_chunks
        takes them. Returns, per entry and in order, None (accepted) or the
        error push_chunks would raise, as data (`ServiceError.to_data()`); a
        task of another session is Forbidden (`foreign_task`). One entry's
        error never stops the others. Raises only Unavailable."""

    @abc.abstractmethod
    def touch(self, session_id: str) -> None:
        """Count the session live from now (it has just registered)."""

    @abc.abstractmethod
    def seen(self, session_id: str) -> None:
        """The session's publisher showed a sign of life (a heartbeat): it is
        not lost. (Polls, results and chunks are signs of life too.)"""

    @abc.abstractmethod
    def is_live(self, session_id: str) -> bool:
        """Whether a poll is held, or ended less than SESSION_LIVENESS ago, on any worker."""

    @abc.abstractmethod
    def drop_session(self, session_id: str, reason: str) -> int:
        """Fail every unfinished task of the session with `reason`, end its held
        polls and forget it. Returns how many tasks were failed."""

    # -- public LLMs' rows, as workers remember them (services/routes.py) ----

    @abc.abstractmethod
    def routes_version(self) -> str:
        """Where public LLMs' rows stand, on every worker: it moves at every
        `routes_changed`."""

    @abc.abstractmethod
    def routes_changed(self, later_if_unreachable: bool = False) -> None:
        """A public LLM's row changed, or is about to: move the version. With
        `later_if_unreachable`, never raises: a move that cannot be made now
        is made as soon as it can."""

    # -- operations --------------------------------------------------------

    @abc.abstractmethod
    def gauges(self) -> dict:
        """What the bus holds now, over every worker: `{tasks_waiting: {llm:
        n}, tasks_in_flight: {llm: n}, held_polls, live_sessions,
        redeliveries}` (tasks queued for a publisher; picked and unfinished;
        polls held; live sessions; redeliveries so far, a counter)."""

    def ping(self) -> None:
        """Raise Unavailable when the bus cannot be reached (`/readyz`)."""

    def close(self) -> None:
        """Stop background work and let go of connections (tests, shutdown)."""

    def stats(self) -> dict:
        """Sizes of this process's internal maps (tests check they drain to zero)."""
        return {}


class RoutesChanged(Exception):
    """A public LLM's row remembered by this worker may have changed: read it again."""


def too_many_pending(llm: str, limit: int) -> TooManyRequests:
    return TooManyRequests(f"Too many requests waiting on LLM '{llm}' (limit {limit}); "
                           f"retry shortly", headers={"Retry-After": "1"})


def too_many_polls(session_id: str, limit: int) -> TooManyRequests:
    return TooManyRequests(f"Session '{session_id}' already holds {limit} polls; poll again "
                           f"when one returns", code="too_many_polls",
                           headers={"Retry-After": "1"})


# What a task can end with, as data (the Redis bus's scripts write the same).

def not_picked_up(llm: str) -> dict:
    return GatewayTimeout(f"The publisher of LLM '{llm}' did not pick up the task in time",
                          code="pickup_timeout").to_data()


def not_finished(llm: str) -> dict:
    return GatewayTimeout(f"The publisher of LLM '{llm}' did not finish the task in time",
                          code="task_timeout").to_data()


def not_acknowledged(llm: str, attempts: int) -> dict:
    return GatewayTimeout(f"The publisher of LLM '{llm}' did not acknowledge the task "
                          f"({attempts} deliveries)", code="task_not_acknowledged").to_data()


def publisher_lost(llm: str, lost_timeout: float) -> dict:
    return BadGateway(f"The publisher of LLM '{llm}' was lost: no sign of life for "
                      f"{lost_timeout:g} s", code="publisher_lost").to_data()


def publisher_disconnected(llm: str, reason: str) -> dict:
    return Unavailable(f"LLM '{llm}': {reason}", code="publisher_disconnected").to_data()


def stream_idle(llm: str, idle_timeout: float) -> dict:
    return GatewayTimeout(f"No stream data from the publisher of LLM '{llm}' for "
                          f"{idle_timeout:g} s", code="stream_idle_timeout").to_data()


def publisher_offline(llm: str) -> Unavailable:
    return Unavailable(f"Virtual LLM '{llm}' has no live publisher session",
                       code="publisher_offline")


def too_many_queued(queue: str, limit: int, token: bool) -> TooManyRequests:
    what = "this token's requests" if token else "requests"
    return TooManyRequests(f"Too many {what} waiting on {queue_label(queue)} (limit {limit}); "
                           f"retry shortly", code="too_many_queued" if token
                           else "too_many_pending", headers={"Retry-After": "1"})


def queue_timeout(queue: str, waited: float) -> Unavailable:
    return Unavailable(f"Waited {waited:g} s for a turn on {queue_label(queue)}; retry shortly",
                       code="queue_timeout", headers={"Retry-After": "1"})


def queue_label(queue: str) -> str:
    return f"pool '{queue[5:]}'" if queue.startswith("pool:") else f"LLM '{queue}'"
