"""The task bus interface: how a client's request reaches a publisher and back.

One small interface, two sides:

- the client side submits a task for a publisher session, then waits for its
  outcome (`wait_result`) or reads its chunks (`next_chunks`), and always
  releases it (`release`, or use `open_task` as a context manager); a call to
  a public LLM holds a slot (`acquire_slot` / `release_slot`) so that
  MAX_PENDING_PER_LLM counts it too;
- the publisher side long-polls its session (`poll`), posts an outcome
  (`complete`) or chunks (`push_chunks`), and disconnects (`drop_session`).

Tasks, outcomes, chunks and errors are plain JSON-able data: each waiter
raises an exception of its own, built from the stored error. The in-memory
bus is for a single worker process only (like python-socketio's in-memory
manager); the Redis bus spans workers and hosts.
"""
import abc
import contextlib

from services.errors import TooManyRequests

MAX_TASKS_PER_POLL = 64
MAX_BUFFERED_CHUNKS = 10_000  # unread chunks of one stream: past it, the publisher gets 429
TOMBSTONE_TTL = 600.0         # a finished task is remembered this long (late posts: 409/410)
DONE_MARKER = "[DONE]"


class TaskBus(abc.ABC):
    """See the module docstring. Every wait takes a timeout; nothing waits forever.
    Any method may raise Unavailable (`bus_unavailable`) when the bus itself
    cannot be reached."""

    # -- client side -------------------------------------------------------

    @abc.abstractmethod
    def submit(self, session_id: str, task: dict, *, llm: str, owner: str | None, limit: int,
               pickup_timeout: float, timeout: float, share_key: str | None = None) -> str:
        """Queue `task` (a dict with `kind`, no `task_id`) for the session and
        return its task id. `owner` is the token that owns the session: only it
        may answer the task. With `share_key`, a task with the same key still in
        flight is joined instead (its waiters share one outcome). `limit` caps
        the requests waiting on `llm` (slots included): past it, TooManyRequests.
        The task expires unless picked up within `pickup_timeout` and finished
        within `timeout` of pickup."""

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
    def acquire_slot(self, llm: str, limit: int) -> object:
        """Count one more request in flight at `llm` (a public LLM's upstream
        call), within `limit` across every worker: past it, TooManyRequests.
        Returns the slot to hand to `release_slot`."""

    @abc.abstractmethod
    def release_slot(self, slot: object) -> None:
        """Free a slot from `acquire_slot`. Never raises."""

    # -- publisher side ----------------------------------------------------

    @abc.abstractmethod
    def poll(self, session_id: str, wait: float, connected=None) -> list[dict]:
        """Hand over the session's queued tasks (at most MAX_TASKS_PER_POLL),
        waiting up to `wait` seconds for the first one. Marks the session live
        while held. `connected()`, when given, is asked right before a
        hand-over: a poll whose publisher has hung up returns [] and leaves the
        tasks queued for the next one."""

    @abc.abstractmethod
    def task_info(self, task_id: str, owner: str | None = None) -> dict:
        """`{task_id, session_id, owner, kind, llm}` of a task a publisher may
        answer. Raises NotFound (unknown), Forbidden (with `owner`: another
        token's task, finished or not), Conflict (already completed), Gone
        (cancelled, expired, failed, or the client's worker is gone)."""

    @abc.abstractmethod
    def complete(self, task_id: str, outcome: dict, owner: str | None = None) -> None:
        """Post the outcome (`{status, body}` or `{error}`). Raises like
        `task_info`."""

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
    def touch(self, session_id: str) -> None:
        """Count the session live from now (it has just registered)."""

    @abc.abstractmethod
    def is_live(self, session_id: str) -> bool:
        """Whether a poll is held, or ended less than SESSION_LIVENESS ago, on any worker."""

    @abc.abstractmethod
    def drop_session(self, session_id: str, reason: str) -> int:
        """Fail every unfinished task of the session with `reason`, end its held
        polls and forget it. Returns how many tasks were failed."""

    # -- operations --------------------------------------------------------

    def ping(self) -> None:
        """Raise Unavailable when the bus cannot be reached (`/readyz`)."""

    def close(self) -> None:
        """Stop background work and let go of connections (tests, shutdown)."""

    def stats(self) -> dict:
        """Sizes of this process's internal maps (tests check they drain to zero)."""
        return {}


def too_many_pending(llm: str, limit: int) -> TooManyRequests:
    return TooManyRequests(f"Too many requests waiting on LLM '{llm}' (limit {limit}); "
                           f"retry shortly", headers={"Retry-After": "1"})
