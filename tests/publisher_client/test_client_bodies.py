"""Streamed bodies read by the one body-reader thread: event-stream and
chunked decoding at any split, every framing, backpressure, aborts, broken
and silent backends, many streams at once, all over real sockets."""
import json
import socket
import threading

import pytest

from publisher_client.backends import Aborted, Call, OpenAIBackend
from publisher_client.bodies import BodyReader, Dechunker, Event, SseParser
from publisher_client.config import LlmConfig
from publisher_client.errors import BackendUnavailable
from tests.publisher_client.helpers import wait_for

EVENTS = (b"data: one\n\n"
          b": a comment\nid: 7\nretry: 100\n\n"
          b"event: delta\ndata: two\r\ndata:  three\r\n\r\n"
          b"data: [DONE]\n\n")


def test_an_event_stream_split_anywhere_gives_the_same_payloads():
    whole = SseParser().feed(EVENTS)
    assert whole == ["one", "two\n three", "[DONE]"]
    assert whole[1].event == "delta" and not isinstance(whole[0], Event)
    for size in (1, 2, 3, 7):
        parser = SseParser()
        pieces = [parser.feed(EVENTS[i:i + size]) for i in range(0, len(EVENTS), size)]
        assert [p for piece in pieces for p in piece] == whole
        assert parser.end() == []


def test_an_unterminated_last_event_comes_at_the_end():
    parser = SseParser()
    assert parser.feed(b"data: a\n\ndata: b") == ["a"]
    assert parser.end() == ["b"]


def chunk(piece: bytes) -> bytes:
    return b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(chunk(p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


def test_a_chunked_body_split_anywhere_gives_its_content_then_done():
    body = chunked(b"data: one\n\n", b"data: t", b"wo\n\n", trailer=b"X-Trailer: 1\r\n")
    for size in (1, 2, 5, len(body)):
        dechunker, out = Dechunker(), b""
        for i in range(0, len(body), size):
            assert not dechunker.done
            out += dechunker.feed(body[i:i + size])
        assert dechunker.done and out == b"data: one\n\ndata: two\n\n"


@pytest.mark.parametrize("body", [b"zz\r\nabc\r\n", b"3\r\nabcXY"])
def test_a_body_that_is_not_chunked_http_is_refused(body):
    with pytest.raises(ValueError):
        Dechunker().feed(body)


class Sink:
    """Collects payloads like a Stream; `room` decides whether it wants more."""

    def __init__(self, room=True):
        self.payloads = []
        self.room = room
        self.lock = threading.Lock()

    def offer(self, payload):
        with self.lock:
            self.payloads.append(payload)
            return self.room

    def has_room(self):
        return self.room


class Reading:
    """A BodyReader.read on its own thread, over one end of a socketpair."""

    def __init__(self, reader, framing="chunked", length=None, sink=None, read_timeout=30.0):
        self.backend, mine = socket.socketpair()
        self.call, self.sink = Call(), sink or Sink()
        self.call.hold(mine)
        self.error = None
        self.done = threading.Event()

        def run():
            try:
                reader.read(mine, framing, length, self.call, self.sink, read_timeout,
                            lambda what, cause: BackendUnavailable(f"backend {what}", str(cause)))
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                self.error = exc
            finally:
                mine.close()
                self.done.set()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def ended(self, timeout=5.0):
        assert self.done.wait(timeout), "the read did not end"
        return self


@pytest.fixture
def reader():
    return BodyReader(idle_seconds=0.2)


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_each_framing_is_read_to_its_end(reader, framing):
    content = b"data: a\n\ndata: b\n\ndata: c"   # the last event unterminated
    reading = Reading(reader, framing, length=len(content) if framing == "length" else None)
    if framing == "chunked":
        reading.backend.sendall(chunked(content[:9], content[9:]))
    else:
        reading.backend.sendall(content)
        if framing == "close":
            reading.backend.close()
    assert reading.ended().error is None
    assert reading.sink.payloads == ["a", "b", "c"]


def test_done_ends_the_read_without_waiting_for_the_connection(reader):
    reading = Reading(reader)
    reading.backend.sendall(chunk(b"data: x\n\ndata: [DONE]\n\n"))
    assert reading.ended().error is None and reading.sink.payloads == ["x"]


def test_a_backend_gone_mid_answer_is_a_broken_stream(reader):
    reading = Reading(reader)
    reading.backend.sendall(chunked(b"data: a\n\n")[:-5] + b"8\r\ndata")   # cut inside a chunk
    reading.backend.close()
    error = reading.ended().error
    assert isinstance(error, BackendUnavailable) and str(error) == "backend stream broke"
    assert reading.sink.payloads == ["a"]


def test_an_abort_stops_the_read_at_once(reader):
    reading = Reading(reader)
    reading.backend.sendall(chunk(b"data: a\n\n"))
    wait_for(lambda: reading.sink.payloads == ["a"], what="the first payload")
    reading.call.abort()
    assert isinstance(reading.ended().error, Aborted)


def test_a_silent_backend_times_out(reader):
    reading = Reading(reader, read_timeout=0.3)
    error = reading.ended(timeout=10).error
    assert isinstance(error, BackendUnavailable) and str(error) == "backend timed out"


def test_a_full_stream_pauses_its_reading_until_it_has_room(reader):
    reading = Reading(reader, sink=Sink(room=False))
    reading.backend.sendall(chunk(b"data: 1\n\n"))
    wait_for(lambda: reading.sink.payloads == ["1"], what="the first payload")
    reading.backend.sendall(chunk(b"data: 2\n\n"))
    other = Reading(reader)   # the reader goes on reading the others meanwhile
    other.backend.sendall(chunked(b"data: other\n\n"))
    assert other.ended().sink.payloads == ["other"]
    assert reading.sink.payloads == ["1"]   # held in the socket, not read
    reading.sink.room = True
    reading.backend.sendall(chunked(b"data: 3\n\n"))
    assert reading.ended().error is None
    assert reading.sink.payloads == ["1", "2", "3"]


def test_an_abort_reaches_a_paused_stream(reader):
    reading = Reading(reader, sink=Sink(room=False))
    reading.backend.sendall(chunk(b"data: 1\n\n"))
    wait_for(lambda: reading.sink.payloads == ["1"], what="the first payload")
    reading.call.abort()
    assert isinstance(reading.ended().error, Aborted)


def test_the_reader_thread_ends_when_idle_and_comes_back(reader):
    Reading(reader).backend.sendall(chunked(b"data: a\n\n"))
    wait_for(lambda: reader._thread is None, what="the idle reader to end")
    reading = Reading(reader)
    reading.backend.sendall(chunked(b"data: b\n\n"))
    assert reading.ended().sink.payloads == ["b"]


def _chat_body(text):
    return {"model": "fake-model", "stream": True,
            "messages": [{"role": "user", "content": text}]}


def _contents(payloads):
    return "".join((json.loads(p)["choices"][0].get("delta") or {}).get("content") or ""
                   for p in payloads if p != "[DONE]")


def _backend(fake):
    return OpenAIBackend(LlmConfig(name="b", type="openai", url=fake.url, model="fake-model",
                                   max_concurrency=64))


def _relay_all(backend, texts):
    """Each text's stream on its own task thread; the payloads each got."""
    sinks, errors = [Sink() for _ in texts], []

    def one(text, sink):
        try:
            answer = backend.answer(_chat_body(text), True, Call())
            assert answer.pump is not None   # read by the body reader, not this thread
            answer.pump(sink)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=one, args=args) for args in zip(texts, sinks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    return [sink.payloads for sink in sinks]


def test_many_backend_streams_share_the_one_reader_thread(fake_openai):
    texts = [" ".join(f"w{n}-{i}" for i in range(20)) for n in range(48)]
    assert [_contents(p) for p in _relay_all(_backend(fake_openai), texts)] == texts


def test_a_close_delimited_backend_stream_is_read_whole(fake_openai):
    words = [f"w{i} " for i in range(20)]
    for _ in range(8):
        fake_openai.script(chunks=words, chunked=False, chunk_delay=0.002)
    got = _relay_all(_backend(fake_openai), ["x"] * 8)
    assert [_contents(p) for p in got] == ["".join(words)] * 8


class FailingSink(Sink):
    def offer(self, payload):
        raise RuntimeError("the sink broke")


def test_a_failure_with_one_stream_ends_that_stream_only(reader):
    broken, other = Reading(reader, sink=FailingSink()), Reading(reader)
    broken.backend.sendall(chunk(b"data: a\n\n"))
    error = broken.ended().error
    assert isinstance(error, BackendUnavailable) and str(error) == "backend stream broke"
    other.backend.sendall(chunked(b"data: still here\n\n"))
    assert other.ended().error is None and other.sink.payloads == ["still here"]
