"""The publisher: register, heartbeat, long-poll, run tasks, disconnect.

Threads: the caller's thread registers and long-polls; a timer thread
heartbeats; an LLM's infer tasks run on its pool of at most
`max_concurrency` threads (the rest wait in line, a bounded one); one
body-reader thread reads every streamed answer's body (bodies.py) and one
sender thread posts every stream's chunks together (streaming.py). They
are daemon threads, so a backend that never answers cannot hold up the
exit. A cancel task (or a 410 from the server) aborts the matching backend
request at once.
"""
import contextlib
import logging
import queue
import threading
import time

from publisher_client.api import SwitchboardAPI
from publisher_client.backends import DEFAULT_ENDPOINT, DONE, Aborted, Call, create_backend
from publisher_client.backoff import Backoff
from publisher_client.config import Config, LlmConfig
from publisher_client.errors import (BackendUnavailable, PublisherError, ServerError,
                                     ServerUnavailable, SessionNotFound, TaskFailure, TaskGone,
                                     WakeError)
from publisher_client.session_file import load_session_id, save_session_id
from publisher_client.streaming import SessionSender
from publisher_client.wake import Waker

log = logging.getLogger(__name__)

RESULT_ATTEMPTS = 6
WAKE_HEARTBEAT_SECONDS = 5.0   # while a slow backend boots, keep the rows fresh
REGISTER_AGAIN_SECONDS = 5.0   # forgotten again this soon after a register: back off first
SHUTDOWN_WAIT_SECONDS = 15.0   # for a heartbeat or register in flight, before the DELETE
CUT_POLL_SECONDS = 2.0         # a poll that lost its connection after this long was cut, not refused
MIN_POLL_WAIT = 1.0
BACKLOG_PER_LLM = 256          # tasks waiting in line for an LLM's pool (the server's default cap)
IDLE_THREAD_SECONDS = 30.0     # a pool thread with nothing to do for this long ends


class TaskPool:
    """At most `size` daemon threads run an LLM's tasks, started as tasks
    come and ended when idle; up to `backlog` more tasks wait in line."""

    def __init__(self, name: str, size: int, backlog: int = BACKLOG_PER_LLM,
                 idle_seconds: float = IDLE_THREAD_SECONDS):
        self.name = name
        self.size = size
        self.idle_seconds = idle_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=backlog)
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._waiting = 0

    def submit(self, fn, *args) -> bool:
        """Run fn(*args) on the pool; False when the line is full."""
        with self._lock:
            try:
                self._queue.put_nowait((fn, args))
            except queue.Full:
                return False
            self._waiting += 1
            if self._waiting > self._idle and self._threads < self.size:
                self._threads += 1
                _spawn(self._work, name=f"llm-{self.name}-{self._threads}")
        return True

    def _work(self):
        while True:
            with self._lock:
                self._idle += 1
            try:
                fn, args = self._queue.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queue.empty():
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._waiting -= 1
            try:
                fn(*args)
            except Exception:  # the task logs its own failures; the thread lives on
                log.exception("a task of LLM %s failed", self.name)


class LocalLlm:
    """A published LLM: its config, its backend, its wake recipe and workers."""

    def __init__(self, config: LlmConfig, on_wake_tick):
        self.config = config
        self.name = config.name
        self.backend = create_backend(config)
        self.waker = (Waker(config.name, self.backend, config.wake, on_tick=on_wake_tick)
                      if config.wake else None)
        self.pool = TaskPool(config.name, config.max_concurrency)

    def register_item(self) -> dict:
        """This LLM as the server's register payload wants it. The seed's
        rule: hibernating only when a wake recipe exists and the backend is down."""
        item = {"name": self.name, "type": self.config.type, "model": self.config.model,
                "max_concurrency": self.config.max_concurrency,  # the server caps it too
                "endpoints": list(self.config.endpoints)}
        for key in ("tier", "description", "extra_config"):
            if getattr(self.config, key) is not None:
                item[key] = getattr(self.config, key)
        asleep = self.waker is not None and not _safely(self.backend.available)
        item["initial_status"] = "hibernating" if asleep else "active"
        return item


def _safely(probe) -> bool:
    try:
        return bool(probe())
    except Exception:  # the seed's rule: a probe that throws means "not available"
        return False


class Publisher:
    def __init__(self, config: Config, api: SwitchboardAPI | None = None, backoff=None):
        self.config = config
        self.api = api or SwitchboardAPI(config.server, config.token)
        self.stopping = threading.Event()
        self.backoff = backoff or Backoff(sleep=self.stopping.wait)
        # Its own: a successful register resets self.backoff.
        self.register_backoff = Backoff(base=1.0, cap=60.0, sleep=self.backoff.sleep)
        self.llms = {llm.name: LocalLlm(llm, self._heartbeat_while_waking)
                     for llm in config.llms}
        self.session_id: str | None = None
        self.generation = 0          # bumped by every successful register
        self.registered = False
        self._registered_at = float("-inf")
        self._register_lock = threading.Lock()
        self._heartbeat_lock = threading.Lock()
        self._calls: dict[str, Call] = {}
        self._calls_lock = threading.Lock()
        self.sender = SessionSender(self.api.post_session_chunks)
        self._last_heartbeat = 0.0
        self._heartbeat_thread: threading.Thread | None = None
        self.poll_wait = config.poll_wait_seconds  # shortened when a proxy cuts long polls

    # -- lifecycle -------------------------------------------------------------

    def run(self):
        """Register, then heartbeat and long-poll until stop() (or
        KeyboardInterrupt); then disconnect. Raises ServerError when the
        server refuses us for good (bad token, name taken)."""
        try:
            self.check_backends()
            if not self.connect():
                return
            self._heartbeat_thread = _spawn(self._heartbeat_loop, name="heartbeat")
            self._poll_loop()
        finally:
            self.shutdown()

    def check_backends(self) -> list[str]:
        """Warn about each backend that does not answer now (a typo in `url`,
        a server not started yet): it is published all the same. Returns the
        names of those LLMs."""
        down = [llm for llm in self.llms.values() if not _safely(llm.backend.available)]
        for llm in down:
            then = ("it is published hibernating and woken by its recipe on the first request"
                    if llm.waker else "requests to it fail until it answers")
            log.warning("backend of LLM %s is not available (GET %s/models failed): %s",
                        llm.name, llm.config.url, then)
        return [llm.name for llm in down]

    def stop(self):
        """Ask run() to return (after the poll in flight)."""
        self.stopping.set()

    def register(self) -> str:
        """Publish the LLMs and agents once, under the sticky session id.
        Raises ServerUnavailable (retry) or ServerError (give up)."""
        session_id = self.session_id or load_session_id(self.config.session_file,
                                                        self.config.server)
        llms = [llm.register_item() for llm in self.llms.values()]
        agents = [dict(agent) for agent in self.config.agents]
        try:
            reply = self.api.register(session_id, llms, agents)
        except ServerError as exc:
            if exc.status != 403 or exc.code != "foreign_session" or session_id is None:
                raise
            # The saved id belongs to another token (a copied file, a new token).
            log.warning("session %s belongs to another token; starting a new session",
                        session_id)
            reply = self.api.register(None, llms, agents)
        self.session_id = reply["session_id"]
        self.generation += 1
        self.registered = True
        self._registered_at = time.monotonic()
        try:
            save_session_id(self.config.session_file, self.config.server, self.session_id)
        except OSError as exc:
            log.warning("could not save the session id to %s (%s); a restart will start "
                        "a new session", self.config.session_file, exc.strerror or exc)
        statuses = ", ".join(f"{row['name']} ({row.get('status', '?')})"
                             for row in reply.get("llms") or [])
        log.info("registered session %s: LLMs %s; %d agent(s)", self.session_id,
                 statuses or "none", len(reply.get("agents") or []))
        return self.session_id

    def connect(self) -> bool:
        """register(), retrying with backoff while the server is unreachable.
        Returns False when stop() came first."""
        while not self.stopping.is_set():
            try:
                self.register()
            except ServerUnavailable as exc:
                self._wait_for_server(exc)
                continue
            self._recovered()
            return True
        return False

    def shutdown(self):
        """Stop polling, abort running backend requests, end the session."""
        self.stopping.set()
        with self._calls_lock:
            calls = list(self._calls.values())
        for call in calls:
            call.abort()
        self.sender.close()
        # A heartbeat or register in flight would revive the rows right after
        # the DELETE: let it land first. Once stopping, none starts.
        with _holding(self._heartbeat_lock), _holding(self._register_lock):
            if self.registered and self.session_id:
                try:
                    self.api.disconnect(self.session_id)
                    log.info("disconnected session %s", self.session_id)
                except PublisherError as exc:
                    log.warning("could not disconnect session %s: %s", self.session_id, exc)
                self.registered = False

    # -- the poll loop and the heartbeat --------------------------------------

    def _poll_loop(self):
        acks: list[str] = []  # what the last poll brought, acknowledged by the next one
        while not self.stopping.is_set():
            generation, session_id = self.generation, self.session_id
            started = time.monotonic()
            try:
                tasks = self.api.poll(session_id, self.poll_wait, acks)
            except SessionNotFound:
                acks = []  # a new session has none of them
                self._register_again(generation)
                continue
            except ServerUnavailable as exc:
                held = time.monotonic() - started
                if exc.status is None and held >= CUT_POLL_SECONDS:
                    self._poll_cut(held)  # the server was there: poll again at once
                else:
                    self._wait_for_server(exc)
                continue
            self._recovered()
            acks = [task["task_id"] for task in tasks if isinstance(task, dict)
                    and task.get("kind") != "cancel" and isinstance(task.get("task_id"), str)]
            for task in tasks:
                self._start(task)

    def _start(self, task):
        """dispatch() one task of a batch. One that cannot start gets an error
        and costs neither the rest of the batch nor the poll loop."""
        try:
            self.dispatch(task)
        except Exception:
            task_id = task.get("task_id") if isinstance(task, dict) else None
            log.exception("task %s could not start", task_id)
            if isinstance(task_id, str) and task_id:  # off the poll loop: it may retry
                _spawn(self._post_result, task_id,
                       {"error": "the publisher could not start this task"},
                       name=f"task-{task_id}")

    def _poll_cut(self, held: float):
        """A held poll lost its connection: a proxy or NAT on the way cuts idle
        requests (often at 20-60 s). Poll with a shorter wait from now on
        rather than back off as from an outage (tasks would wait meanwhile)."""
        wait = max(MIN_POLL_WAIT, round(held * 0.8, 1))
        if wait < self.poll_wait:
            log.warning("a poll was cut after %.1f s (a proxy's idle timeout?); polling with "
                        "wait=%g s from now on", held, wait)
            self.poll_wait = wait

    def _heartbeat_loop(self):
        # An unexpected error must not end the heartbeats (the rows would go
        # inactive while we still serve): log it, try again soon, backing off.
        interval = self.config.heartbeat_seconds
        backoff = Backoff(base=min(1.0, interval), cap=interval)
        delay = interval
        while not self.stopping.wait(delay):
            try:
                self.heartbeat()
            except Exception:
                delay = backoff.next_delay()
                log.exception("heartbeat failed; trying again in %.1f s", delay)
            else:
                backoff.reset()
                delay = interval

    def heartbeat(self):
        """Keep the rows fresh (from the timer, and while a backend wakes). Does
        nothing once stopping: after shutdown's DELETE it would revive them."""
        with self._heartbeat_lock:   # shutdown waits for the one in flight
            if self.stopping.is_set():
                return
            generation, session_id = self.generation, self.session_id
            try:
                self.api.heartbeat(session_id)
                self._last_heartbeat = time.monotonic()
                return
            except SessionNotFound:
                pass
            except ServerUnavailable as exc:
                log.debug("heartbeat failed: %s", exc)   # the poll loop reports outages
                return
            except ServerError as exc:
                log.warning("heartbeat refused: %s", exc)
                return
        try:   # outside the heartbeat lock: the register lock guards this
            self._register_again(generation)
        except PublisherError as exc:   # the poll loop meets it too, and ends run()
            log.warning("registering again failed: %s", exc)

    def _heartbeat_while_waking(self):
        if time.monotonic() - self._last_heartbeat >= WAKE_HEARTBEAT_SECONDS:
            self.heartbeat()

    def _register_again(self, generation: int):
        """The server forgot our session (restart, GC): register again, once
        for all the threads that noticed."""
        with self._register_lock:
            if self.generation != generation or self.stopping.is_set():
                return
            if time.monotonic() - self._registered_at < REGISTER_AGAIN_SECONDS:
                # Forgotten right after registering: something is off server-side;
                # do not hammer it with registers.
                delay = self.register_backoff.next_delay()
                log.warning("server forgot session %s within %g s of registering; "
                            "registering again in %.1f s", self.session_id,
                            REGISTER_AGAIN_SECONDS, delay)
                self.register_backoff.sleep(delay)
                if self.stopping.is_set():
                    return
            else:
                self.register_backoff.reset()
                log.warning("server does not know session %s; registering again",
                            self.session_id)
            self.connect()

    def _wait_for_server(self, exc: Exception):
        delay = self.backoff.next_delay()
        log.warning("cannot reach server (%s); retrying in %.2f s", exc, delay)
        self.backoff.sleep(delay)

    def _recovered(self):
        if self.backoff.failing:
            log.info("reconnected to server")
            self.backoff.reset()

    # -- tasks ----------------------------------------------------------------

    def dispatch(self, task: dict):
        """Start one task from a poll without blocking the poll loop."""
        kind, task_id = (task.get("kind"), task.get("task_id")) if isinstance(task, dict) \
            else (None, None)
        if not task_id:
            log.warning("ignoring a task without task_id: %r", task)
            return
        if kind == "cancel":
            with self._calls_lock:
                call = self._calls.get(task_id)
            if call is not None:
                log.info("task %s cancelled by the server", task_id)
                call.abort()
            return
        with self._calls_lock:
            if task_id in self._calls:  # delivered again: our acknowledgement was lost
                log.info("task %s delivered again (attempt %s); it is already running",
                         task_id, task.get("attempt"))
                return
        llm = self.llms.get(task.get("llm"))
        if llm is None or kind not in ("infer", "wake"):
            what = f"LLM '{task.get('llm')}' is not published here" if llm is None \
                else f"unknown task kind {kind!r}"
            log.warning("task %s: %s", task_id, what)
            _spawn(self._post_result, task_id, {"error": what}, name=f"task-{task_id}")
            return
        log.info("task %s (%s, %s): request %s", task_id, llm.name, kind, task.get("request_id"))
        call = Call()
        with self._calls_lock:
            self._calls[task_id] = call
        if kind == "wake":
            _spawn(self._run_wake, llm, task_id, name=f"wake-{task_id}")
            return
        if not llm.pool.submit(self._infer, llm, task, call):
            with self._calls_lock:
                self._calls.pop(task_id, None)
            log.warning("task %s: %s has %d tasks waiting in line already; refusing it",
                        task_id, llm.name, BACKLOG_PER_LLM)
            _spawn(self._post_result, task_id, {"error": f"the publisher of LLM '{llm.name}' "
                                                         "is too busy"}, name=f"task-{task_id}")

    def _run_wake(self, llm: LocalLlm, task_id: str):
        try:
            self._wake(llm, task_id)
        finally:
            with self._calls_lock:
                self._calls.pop(task_id, None)

    def _wake(self, llm: LocalLlm, task_id: str):
        if llm.waker is None:
            self._post_result(task_id, {"error": f"LLM '{llm.name}' has no wake recipe"})
            return
        try:
            ms = llm.waker.wake()
        except WakeError as exc:   # the server gets the short message, the log the detail
            log.warning("task %s: waking %s failed: %s", task_id, llm.name, exc.detail)
            self._post_result(task_id, {"error": str(exc)})
            return
        self.heartbeat()
        self._post_result(task_id, {"status": 200, "body": {"ok": True, "ms": ms}})

    def _infer(self, llm: LocalLlm, task: dict, call: Call):
        task_id, started = task["task_id"], time.monotonic()
        streaming = bool(task.get("streaming"))
        endpoint = task.get("endpoint", DEFAULT_ENDPOINT)
        body = dict(task.get("body") or {})
        if streaming or "stream" in body:  # an embeddings body has no `stream`
            body["stream"] = streaming
        try:
            call.check()   # cancelled while waiting for a slot
            answer = self._answer(llm, endpoint, body, streaming, call)
            if not answer.streamed:
                self._post_result(task_id, {"status": answer.status, "body": answer.body})
                log.info("task %s (%s) done in %d ms: status %d", task_id, llm.name,
                         _ms_since(started), answer.status)
            else:
                self._relay_stream(task_id, llm, answer, call, started)
        except Aborted:
            log.info("task %s (%s) stopped after %d ms: the client went away", task_id,
                     llm.name, _ms_since(started))
        except TaskFailure as exc:   # the server gets the short message, the log the detail
            log.warning("task %s (%s) failed: %s", task_id, llm.name, exc.detail)
            self._post_result(task_id, {"error": str(exc)})
        except Exception:
            log.exception("task %s (%s) failed", task_id, llm.name)
            self._post_result(task_id, {"error": "the publisher failed on this task"})
        finally:
            with self._calls_lock:
                self._calls.pop(task_id, None)

    def _answer(self, llm: LocalLlm, endpoint, body, streaming, call):
        """Ask the backend's `endpoint`; when it is down and has a wake recipe,
        wake it first and ask again."""
        try:
            return llm.backend.answer(body, streaming, call, endpoint)
        except BackendUnavailable:
            if llm.waker is None:
                raise
            llm.waker.wake()
            call.check()
            return llm.backend.answer(body, streaming, call, endpoint)

    def _relay_stream(self, task_id, llm, answer, call, started):
        stream = self.sender.open(self.session_id, task_id, on_gone=call.abort)
        try:
            if answer.pump is not None:
                answer.pump(stream)   # the body reader relays it, up to its "[DONE]"
            else:
                for data in answer.chunks:
                    if data == DONE:   # sent with the final batch (and added if missing)
                        break
                    stream.put(data)
        except BackendUnavailable:
            stream.finish(done=False)   # the client keeps what it has, then gets the error
            raise
        except BaseException:
            stream.cancel()
            raise
        finally:
            if answer.chunks is not None:
                answer.chunks.close()
        if stream.finish(done=True, last=DONE):
            log.info("task %s (%s, stream) done in %d ms: %d chunks in %d posts", task_id,
                     llm.name, _ms_since(started), stream.sent, stream.posts)
        else:
            log.info("task %s (%s, stream) stopped after %d ms: the client went away",
                     task_id, llm.name, _ms_since(started))

    def _post_result(self, task_id: str, outcome: dict):
        backoff = Backoff(base=0.25, cap=10.0, sleep=self.stopping.wait)
        for attempt in range(1, RESULT_ATTEMPTS + 1):
            try:
                self.api.post_result(task_id, outcome)
                return
            except TaskGone:
                log.info("task %s: the server no longer wants this result", task_id)
                return
            except ServerUnavailable as exc:
                if attempt == RESULT_ATTEMPTS or self.stopping.is_set():
                    log.warning("task %s: giving up on posting the result: %s", task_id, exc)
                    return
                backoff.wait()
            except ServerError as exc:
                if exc.status == 409 and attempt > 1:   # our earlier attempt got through
                    return
                log.warning("task %s: result refused: %s", task_id, exc)
                if exc.status in (400, 413) and "error" not in outcome:
                    # Too big or malformed for the server: without a word from us
                    # the client would wait for the INFER_TIMEOUT's 504.
                    self._post_result(task_id,
                                      {"error": f"answer refused by server ({exc.status})"})
                return


@contextlib.contextmanager
def _holding(lock, timeout=SHUTDOWN_WAIT_SECONDS):
    """Hold `lock` if it comes within `timeout`; go on without it otherwise."""
    acquired = lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        if acquired:
            lock.release()


def _spawn(target, *args, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
