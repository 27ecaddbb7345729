"""The session's chunk sender: every stream's chunks in shared posts, one
thread whatever the number of streams, a window that grows with load,
consecutive seq numbers, safe retries, and per-entry 410 and 429."""
import threading
import time

import pytest
import responses

from publisher_client import streaming
from publisher_client.backoff import Backoff
from publisher_client.errors import ServerError, ServerUnavailable
from publisher_client.streaming import SessionSender
from tests.publisher_client.helpers import wait_for


class RecordingPost:
    """Records (session_id, entries) of each accepted POST; `failures` are
    raised by the first calls; `answer(entry)` gives an entry's error, if any."""

    def __init__(self, *failures, answer=lambda entry: None):
        self.posts = []
        self.attempts = 0
        self.failures = list(failures)
        self.answer = answer
        self.lock = threading.Lock()

    def __call__(self, session_id, entries):
        with self.lock:
            self.attempts += 1
            if self.failures:
                raise self.failures.pop(0)
            self.posts.append((session_id, [dict(entry) for entry in entries]))
        results = []
        for entry in entries:
            error = self.answer(entry)
            results.append({"task_id": entry["task_id"], "accepted": True} if error is None
                           else {"task_id": entry["task_id"], "error": error})
        return results

    def entries(self, task_id):
        return [entry for _, entries in self.posts for entry in entries
                if entry["task_id"] == task_id]

    def data(self, task_id):
        return [chunk["data"] for entry in self.entries(task_id) for chunk in entry["chunks"]]


def no_wait():
    return Backoff(sleep=lambda _: None)


GONE = {"status": 410, "code": "task_cancelled", "message": "client gone"}
SLOW = {"status": 429, "code": "too_many_pending", "message": "slow client"}


def test_many_streams_share_posts_each_in_order_with_consecutive_seq():
    post = RecordingPost()
    sender = SessionSender(post, min_window=0.02)
    streams = [sender.open("sess-1", f"t{n}") for n in range(50)]

    def feed(stream, n):
        for i in range(20):
            stream.put(f"{n}:{i}")
            time.sleep(0.002)
        assert stream.finish(done=True, last="[DONE]")
    feeders = [threading.Thread(target=feed, args=(s, n)) for n, s in enumerate(streams)]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join(10)

    for n in range(50):
        assert post.data(f"t{n}") == [f"{n}:{i}" for i in range(20)] + ["[DONE]"]
        entries = post.entries(f"t{n}")
        seqs = [entry["seq"] for entry in entries]
        sizes = [len(entry["chunks"]) for entry in entries]
        assert seqs == [sum(sizes[:k]) for k in range(len(entries))]
        assert [entry.get("done", False) for entry in entries][-1] is True
        assert not any(entry.get("done") for entry in entries[:-1])
    assert len(post.posts) < 50 * 21 / 4   # far fewer posts than chunks
    assert {session_id for session_id, _ in post.posts} == {"sess-1"}
    sender.close()


def test_one_sender_thread_serves_every_stream():
    before = sum(t.name == "chunk-sender" for t in threading.enumerate())
    sender = SessionSender(RecordingPost())
    streams = [sender.open("sess-1", f"t{n}") for n in range(32)]
    assert sum(t.name == "chunk-sender" for t in threading.enumerate()) == before + 1
    for stream in streams:
        stream.cancel()
    sender.close()
    wait_for(lambda: sum(t.name == "chunk-sender" for t in threading.enumerate()) == before,
             what="the sender thread to end")


def test_the_window_grows_with_the_running_streams():
    sender = SessionSender(RecordingPost())
    assert sender.window() == streaming.MIN_WINDOW   # nobody: a lone stream's is the least
    streams = [sender.open("sess-1", f"t{n}") for n in range(128)]
    assert 0.02 <= sender.window() <= streaming.MAX_WINDOW
    assert sender.window() * streaming.URGENT_SHARE <= 0.015   # first chunks and ends
    for stream in streams[1:]:
        stream.cancel()
    assert sender.window() == streaming.MIN_WINDOW <= 0.005
    sender.close()


def test_a_lone_streams_first_chunk_goes_at_once_not_when_the_next_comes():
    post = RecordingPost()
    sender = SessionSender(post)
    stream = sender.open("sess-1", "t1")

    started = time.monotonic()
    stream.put("first")
    wait_for(lambda: post.posts, timeout=2, what="the first post")
    latency = time.monotonic() - started
    assert stream.finish(done=True, last="[DONE]")

    assert latency < 0.5   # MIN_WINDOW (a few ms) on an idle machine
    assert post.entries("t1") == [{"task_id": "t1", "seq": 0, "chunks": [{"data": "first"}]},
                                  {"task_id": "t1", "seq": 1, "chunks": [{"data": "[DONE]"}],
                                   "done": True}]
    sender.close()


def test_chunks_arriving_within_the_window_share_a_post():
    post = RecordingPost()
    sender = SessionSender(post, min_window=0.5)
    stream = sender.open("sess-1", "t1")
    stream.sent = 1  # not its first chunk: the whole window applies

    for word in ("a", "b", "c"):
        stream.put(word)
    assert stream.finish(done=True)

    assert post.entries("t1") == [{"task_id": "t1", "seq": 1, "done": True,
                                   "chunks": [{"data": "a"}, {"data": "b"}, {"data": "c"}]}]
    sender.close()



def test_first_chunks_and_ends_lead_a_post_the_server_wakes_their_clients_first():
    post = RecordingPost()
    sender = SessionSender(post, min_window=0.5)
    running, ending, new = (sender.open("sess-1", t) for t in ("running", "ending", "new"))
    running.sent = ending.sent = 1   # past their first chunks
    running.put("older")             # waits a whole window for company
    ending.put("last")
    finishing = threading.Thread(target=ending.finish, kwargs={"done": True})
    finishing.start()                # its end waits only a share of it
    new.put("first")

    wait_for(lambda: post.posts, timeout=2, what="the first post")
    finishing.join(5)
    assert [entry["task_id"] for entry in post.posts[0][1]] == ["ending", "new", "running"]
    for stream in (running, new):
        stream.cancel()
    sender.close()

def test_a_post_is_cut_at_max_chunks():
    post = RecordingPost()
    sender = SessionSender(post, max_chunks=4, min_window=0.2)
    stream = sender.open("sess-1", "t1")
    for i in range(10):
        stream.put(str(i))
    assert stream.finish(done=False)

    assert [len(entry["chunks"]) for entry in post.entries("t1")] == [4, 4, 2]
    assert [entry["seq"] for entry in post.entries("t1")] == [0, 4, 8]
    sender.close()


def test_a_failed_post_is_retried_with_the_same_seq():
    post = RecordingPost(ServerUnavailable("502"), ServerUnavailable("timed out"))
    sender = SessionSender(post, backoff=no_wait())
    stream = sender.open("sess-1", "t1")

    stream.put("a")
    assert stream.finish(done=True, last="[DONE]")

    assert post.attempts >= 3
    assert post.data("t1") == ["a", "[DONE]"]
    assert post.entries("t1")[0]["seq"] == 0
    sender.close()


def test_a_410_entry_stops_only_its_own_stream():
    aborted = {name: threading.Event() for name in ("gone", "kept")}
    post = RecordingPost(answer=lambda entry: GONE if entry["task_id"] == "gone" else None)
    sender = SessionSender(post)
    gone = sender.open("sess-1", "gone", on_gone=aborted["gone"].set)
    kept = sender.open("sess-1", "kept", on_gone=aborted["kept"].set)

    gone.put("a")
    kept.put("a")
    wait_for(aborted["gone"].is_set, what="on_gone of the cancelled stream")
    gone.put("b")   # dropped: the stream has stopped
    kept.put("b")

    assert gone.finish() is False
    assert kept.finish(done=True, last="[DONE]") is True
    assert not aborted["kept"].is_set()
    assert post.data("gone") == ["a"]
    assert post.data("kept") == ["a", "b", "[DONE]"]
    sender.close()


def test_a_429_entry_holds_its_stream_a_moment_then_sends_it(monkeypatch):
    monkeypatch.setattr(streaming, "SLOW_CLIENT_PAUSE", 0.05)
    slow_once = []

    def answer(entry):
        if entry["task_id"] == "slow" and not slow_once:
            slow_once.append(entry["seq"])
            return SLOW
        return None
    post = RecordingPost(answer=answer)
    sender = SessionSender(post)
    slow, other = sender.open("sess-1", "slow"), sender.open("sess-1", "other")

    slow.put("a")
    other.put("a")
    assert slow.finish(done=True, last="[DONE]")
    assert other.finish(done=True, last="[DONE]")

    assert slow_once == [0]
    assert [entry["seq"] for entry in post.entries("slow")][:2] == [0, 0]   # sent again
    assert post.data("slow")[-2:] == ["a", "[DONE]"]
    assert post.data("other") == ["a", "[DONE]"]
    sender.close()


def test_giving_up_after_the_attempts_run_out_stops_the_streams():
    aborted = threading.Event()
    post = RecordingPost(*[ServerUnavailable("down")] * 3)
    sender = SessionSender(post, backoff=no_wait(), max_attempts=3)
    stream = sender.open("sess-1", "t1", on_gone=aborted.set)

    stream.put("a")

    assert stream.finish() is False
    assert aborted.is_set() and post.attempts == 3
    sender.close()


def test_a_refused_session_stops_its_streams():
    aborted = threading.Event()
    post = RecordingPost(ServerError("not yours", status=403, code="foreign_session"))
    sender = SessionSender(post)
    stream = sender.open("sess-1", "t1", on_gone=aborted.set)

    stream.put("a")

    assert stream.finish() is False
    assert aborted.is_set()
    sender.close()


def test_finish_without_done_posts_only_what_is_left():
    post = RecordingPost()
    sender = SessionSender(post)
    stream = sender.open("sess-1", "t1")
    stream.put("partial")

    assert stream.finish(done=False)

    assert post.entries("t1") == [{"task_id": "t1", "seq": 0, "chunks": [{"data": "partial"}]}]
    sender.close()


def test_cancel_drops_what_is_queued():
    post = RecordingPost()
    sender = SessionSender(post, min_window=5.0)   # the post is still gathering
    stream = sender.open("sess-1", "t1")
    stream.sent = 1
    stream.put("never sent")

    stream.cancel()
    sender.close()

    assert post.posts == []


def test_the_final_chunk_rides_with_done_even_after_a_pause():
    """A client must never read [DONE] before the server knows the stream
    ended: the last chunk and `done` go in one entry."""
    post = RecordingPost()
    sender = SessionSender(post)
    stream = sender.open("sess-1", "t1")
    stream.put("a")
    wait_for(lambda: post.posts, what="the first post")

    assert stream.finish(done=True, last="[DONE]")

    assert post.entries("t1")[-1] == {"task_id": "t1", "seq": 1, "done": True,
                                      "chunks": [{"data": "[DONE]"}]}
    sender.close()


@responses.activate
def test_the_session_endpoint_gives_per_entry_results_and_a_429_is_retryable():
    from publisher_client.api import SwitchboardAPI
    from tests.publisher_client.helpers import API, SERVER

    api = SwitchboardAPI(SERVER, "sb_token")
    results = [{"task_id": "t1", "accepted": True},
               {"task_id": "t2", "error": GONE}]
    responses.post(f"{API}/publishers/sess-1/chunks", json={"results": results})
    assert api.post_session_chunks("sess-1", [
        {"task_id": "t1", "seq": 0, "chunks": [{"data": "x"}]},
        {"task_id": "t2", "seq": 3, "chunks": [{"data": "y"}]}]) == results
    responses.post(f"{API}/publishers/sess-1/chunks", status=429, headers={"Retry-After": "1"},
                   json={"error": {"message": "slow down", "type": "rate_limit_error",
                                   "code": "too_many_pending", "details": {}}})
    with pytest.raises(ServerUnavailable):
        api.post_session_chunks("sess-1", [])
