"""A loopback TCP proxy for fault tests, between the code under test and a real
server (Redis, or Switchboard itself), which keeps running for everyone else.

- `cut()` / `restore()`: the server goes away (connections dropped, new ones
  refused) and comes back.
- `blackhole()`: the open connections stay open but every byte on them is
  dropped from then on, while new ones work (a NAT or firewall that forgot its
  idle connections).
- `cut_responses(predicate, count)`: the next `count` answers whose bytes
  match are dropped and their connection closed, after the server wrote them
  (a proxy that cut the poll's answer on its way).
- `cut_waits_after(seconds)`: a request left unanswered that long has its
  connection closed (a proxy's idle timeout cutting long-polls).
"""
import socket
import threading
import time


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = None
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._blackholed: set[socket.socket] = set()
        self._waiting_since: dict[socket.socket, float] = {}  # client socket -> request sent
        self._response_cuts = None  # [predicate, count left]
        self._wait_limit = None
        self.cuts = 0  # connections closed by cut_responses / cut_waits_after
        self.port = None

    def start(self) -> "TcpProxy":
        self._listen()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for pair in pairs:
            _close(*pair)

    def restore(self) -> None:
        self._listen()

    def blackhole(self) -> None:
        """Drop whatever crosses the connections open now, for good; never close them."""
        with self._lock:
            for pair in self._pairs:
                self._blackholed.update(pair)

    def cut_responses(self, predicate, count: int = 1) -> None:
        with self._lock:
            self._response_cuts = [predicate, count]

    def cut_waits_after(self, seconds: float) -> None:
        self._wait_limit = seconds
        self._spawn(self._reap_waits)

    def stop(self) -> None:
        self._wait_limit = None
        self.cut()
        for thread in self._threads:
            thread.join(2)

    def _listen(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self._spawn(self._accept, listener)

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # an idle connection stays open, as through a real network
            with self._lock:
                if self._listener is not listener:
                    _close(client, upstream)
                    return
                self._pairs.append((client, upstream))
            self._spawn(self._pipe, client, upstream, client)
            self._spawn(self._pipe, upstream, client, client)

    def _pipe(self, source, sink, client):
        try:
            while data := source.recv(65536):
                if source in self._blackholed:
                    continue
                if source is client:
                    self._waiting_since.setdefault(client, time.monotonic())
                else:
                    self._waiting_since.pop(client, None)
                    if self._should_cut(data):
                        break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._waiting_since.pop(client, None)
            _close(source, sink)

    def _should_cut(self, data: bytes) -> bool:
        with self._lock:
            if self._response_cuts is None or self._response_cuts[1] <= 0:
                return False
            predicate, _ = self._response_cuts
            if not predicate(data):
                return False
            self._response_cuts[1] -= 1
            self.cuts += 1
            return True

    def _reap_waits(self):
        while self._wait_limit is not None:
            now = time.monotonic()
            for client, since in list(self._waiting_since.items()):
                if now - since >= self._wait_limit:
                    self._waiting_since.pop(client, None)
                    self.cuts += 1
                    with self._lock:
                        pair = next((p for p in self._pairs if p[0] is client), None)
                    _close(*(pair or (client,)))
            time.sleep(0.05)


def _close(*sockets):
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
