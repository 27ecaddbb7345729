"""Streamed answers' bodies, read by one thread for all of them.

A thread per stream blocked on its socket costs a wakeup and a handoff of
the interpreter lock for every token: at 128 streams of 50 tokens a second
that is most of a core in the kernel and in lock handoffs. One thread
waiting on a selector for every stream's socket reads whatever is ready in
turn, at a tenth of the cost. The request and its headers still go through
`requests` (proxies, TLS, the Call that aborts them); only the body of a
plain-TCP, unencoded event stream is read here (backends.py falls back to a
read on the task's own thread otherwise).

`SseParser` turns an event stream's bytes into its `data:` payloads (the
task-thread reader uses it too) and `Dechunker` undoes `Transfer-Encoding:
chunked`: both are fed bytes as they come.
"""
import contextlib
import logging
import selectors
import socket
import threading
import time

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_LINE = 64 * 1024          # a chunk-size or trailer line longer than this is no HTTP
LOOK_TICK = 0.05              # how often held-back streams and read deadlines are looked at
IDLE_SECONDS = 5.0            # the reader thread ends after this long with nothing to read


class Event(str):
    """An SSE payload that came with an `event:` line (responses, Anthropic's
    messages): relayed with its name."""

    event: str

    def __new__(cls, data: str, event: str):
        payload = super().__new__(cls, data)
        payload.event = event
        return payload


class SseParser:
    """An event stream's bytes in, its payloads out: the joined `data:`
    lines of each event (an `Event` when it came with an `event:` line).
    `id:`, `retry:` and `:` comments carry nothing we relay."""

    def __init__(self):
        self._rest = b""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, data: bytes) -> list[str]:
        if not data:
            return []
        *lines, self._rest = (self._rest + data).split(b"\n")
        return [payload for line in lines if (payload := self._line(line)) is not None]

    def end(self) -> list[str]:
        """The body ended: what its last, unterminated event carried."""
        rest, self._rest = self._rest, b""
        payloads = [payload] if rest and (payload := self._line(rest)) is not None else []
        if self._data:
            payloads.append(self._payload())
        return payloads

    def _line(self, raw: bytes) -> str | None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if line == "":
            if self._data:
                return self._payload()
            self._event = None
        elif line.startswith("data:"):
            self._data.append(_field_value(line[5:]))
        elif line.startswith("event:"):
            self._event = _field_value(line[6:]) or None
        return None

    def _payload(self) -> str:
        data, event = "\n".join(self._data), self._event
        self._data, self._event = [], None
        return Event(data, event) if event else data


def _field_value(value: str) -> str:
    return value[1:] if value.startswith(" ") else value


class Dechunker:
    """A `Transfer-Encoding: chunked` body's bytes in, its content out;
    `done` once the last chunk (and its trailer) came. Raises ValueError on
    a body that is not chunked HTTP."""

    def __init__(self):
        self._buffer = b""
        self._left = 0            # bytes of the current chunk still to come
        self._state = "size"      # size -> data -> crlf -> size ... -> trailer
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while not self.done:
            if self._state == "data":
                piece = self._buffer[:self._left]
                if not piece:
                    break
                out.append(piece)
                self._buffer = self._buffer[len(piece):]
                self._left -= len(piece)
                if self._left:
                    break
                self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise ValueError("no CRLF after a chunk")
                self._buffer = self._buffer[2:]
                self._state = "size"
            else:  # a size line, or a trailer line
                line = self._line()
                if line is None:
                    break
                if self._state == "trailer":
                    self.done = not line
                    continue
                size = int(line.split(b";", 1)[0].strip(), 16)  # ValueError: not chunked
                if size < 0:
                    raise ValueError("a negative chunk size")
                self._left, self._state = size, "data" if size else "trailer"
        return b"".join(out)

    def _line(self) -> bytes | None:
        line, sep, rest = self._buffer.partition(b"\r\n")
        if not sep:
            if len(self._buffer) > MAX_LINE:
                raise ValueError("a chunk-size line too long")
            return None
        self._buffer = rest
        return line


class _Body:
    """One answer's body on the reader: its socket, how it ends, where its
    payloads go, and how it ended (`error`: None, or the exception the
    task's thread raises)."""

    def __init__(self, sock, framing, length, call, sink, read_timeout, failure, buffered,
                 clock):
        self.sock = sock
        self.failure = failure
        self.dechunker = Dechunker() if framing == "chunked" else None
        self.left = length if framing == "length" else None
        self.call = call
        self.sink = sink
        self.read_timeout = read_timeout
        self.parser = SseParser()
        self.buffered = buffered
        self.deadline = clock() + read_timeout
        self.paused = False
        self.error: BaseException | None = None
        self.ended = threading.Event()


class BodyReader:
    """The one thread that reads streamed bodies. `read(...)` hands it a
    body and waits until the body has ended; the thread starts with the
    first body and ends once idle for IDLE_SECONDS."""

    def __init__(self, clock=time.monotonic, idle_seconds=IDLE_SECONDS):
        self.clock = clock
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._incoming: list[_Body] = []
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def read(self, sock, framing: str, length: int | None, call, sink, read_timeout: float,
             failure, buffered: bytes = b""):
        """Read an event stream's body from `sock` (non-blocking from now on;
        `buffered`: body bytes already read from it), handing each payload
        to `sink.offer(payload)`, which returns False when the stream wants
        no more for now (its queue is full: reading pauses until
        `sink.has_room()`). `framing`: "chunked", "length" (`length`
        bytes) or "close" (until the backend closes). Returns at the body's
        end or its "[DONE]"; raises Aborted (the call was aborted) or what
        `failure(what, cause)` makes of a broken or silent stream."""
        sock.setblocking(False)
        body = _Body(sock, framing, length, call, sink, read_timeout, failure, buffered,
                     self.clock)
        with self._lock:
            self._incoming.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="body-reader",
                                                daemon=True)
                self._thread.start()
        self._wake()
        while not body.ended.wait(1.0):
            if self._thread is None or not self._thread.is_alive():
                raise failure("stream broke", RuntimeError("the body reader stopped"))
        call.check()  # an abort ends the read as a clean EOF: not the end of the answer
        if body.error is not None:
            raise body.error

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # full: the thread has a wake pending anyway
            pass

    # -- the reader thread ------------------------------------------------------

    def _run(self):
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        bodies: set[_Body] = set()
        idle_since = look_at = self.clock()
        try:
            while True:
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                    if not incoming and not bodies and self.clock() - idle_since >= self.idle_seconds:
                        self._thread = None
                        return
                for body in incoming:
                    bodies.add(body)
                    try:
                        selector.register(body.sock, selectors.EVENT_READ, body)
                    except (ValueError, OSError) as exc:  # closed meanwhile (an abort)
                        body.paused = True   # not registered
                        self._end(body, selector, bodies, body.failure("stream broke", exc))
                        continue
                    if body.buffered:
                        self._guarded(selector, bodies, body, self._take, body.buffered)
                now = self.clock()
                if now >= look_at:  # every tick, not every read: it goes over every body
                    self._look_over(selector, bodies, now)
                    look_at = now + LOOK_TICK
                timeout = look_at - now if bodies else self.idle_seconds
                for key, _ in selector.select(max(0.0, timeout)):
                    if key.fileobj is self._wake_r:
                        _drain(self._wake_r)
                    elif key.data in bodies:
                        self._guarded(selector, bodies, key.data, self._read)
                if bodies or incoming:
                    idle_since = self.clock()
        except Exception as exc:  # never leave a task waiting on a dead reader
            log.exception("the body reader failed")
            for body in list(bodies):
                self._end(body, selector, bodies, body.failure("stream broke", exc))
            with self._lock:
                self._thread = None
        finally:
            selector.close()

    def _guarded(self, selector, bodies, body, step, *args):
        """`step(body, *args, selector, bodies)`: what goes wrong in it (a
        sink that raises) ends that body, not the others."""
        try:
            step(body, *args, selector, bodies)
        except Exception as exc:
            log.exception("reading a streamed body failed")
            self._end(body, selector, bodies, body.failure("stream broke", exc))

    def _read(self, body, selector, bodies):
        try:
            data = body.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(body, selector, bodies, body.failure("stream broke", exc))
            return
        if not data:
            if body.call.aborted.is_set():
                self._finish(body, selector, bodies)   # read() raises Aborted
            elif body.dechunker is None and body.left is None:  # the close is its end
                self._take(body, b"", selector, bodies, eof=True)
            else:
                self._end(body, selector, bodies, body.failure(
                    "stream broke", ConnectionError("the connection closed mid-answer")))
            return
        body.deadline = self.clock() + body.read_timeout
        self._take(body, data, selector, bodies)

    def _take(self, body, data, selector, bodies, eof=False):
        """Relay what `data` completes; end the body at its end or "[DONE]"."""
        try:
            if body.dechunker is not None:
                data = body.dechunker.feed(data)
            elif body.left is not None:
                data = data[:body.left]
                body.left -= len(data)
            payloads = body.parser.feed(data)
        except ValueError as exc:
            self._end(body, selector, bodies, body.failure("stream broke", exc))
            return
        over = eof or (body.dechunker is not None and body.dechunker.done) or body.left == 0
        if over:
            payloads += body.parser.end()
        room = True
        for payload in payloads:
            if payload == "[DONE]":
                self._finish(body, selector, bodies)
                return
            room = body.sink.offer(payload)
        if over:
            self._finish(body, selector, bodies)
        elif not room:
            body.paused = True
            selector.unregister(body.sock)

    def _look_over(self, selector, bodies, now):
        """Resume the paused bodies that have room; end those aborted while
        paused, and those whose backend went quiet for too long."""
        for body in list(bodies):
            if body.paused and (body.call.aborted.is_set() or body.sink.has_room()):
                body.paused = False
                body.deadline = now + body.read_timeout
                selector.register(body.sock, selectors.EVENT_READ, body)
            elif not body.paused and now >= body.deadline:
                self._end(body, selector, bodies, body.failure(
                    "timed out", TimeoutError(f"no byte in {body.read_timeout:g} s")))

    def _finish(self, body, selector, bodies):
        self._end(body, selector, bodies, None)

    def _end(self, body, selector, bodies, error):
        if body not in bodies:
            return
        bodies.discard(body)
        if not body.paused:
            with contextlib.suppress(KeyError, ValueError):  # a step failed half-way
                selector.unregister(body.sock)
        body.error = error
        body.ended.set()


def _drain(sock):
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass
