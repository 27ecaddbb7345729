"""Chunk batching: few posts for a fast backend, low latency for a slow
one, consecutive seq numbers, safe retries, and a stop on 410."""
import threading
import time

import pytest
import responses

from publisher_client.backoff import Backoff
from publisher_client.errors import ServerError, ServerUnavailable, TaskGone
from publisher_client.streaming import ChunkStream
from tests.publisher_client.helpers import wait_for


class RecordingPost:
    """Records (chunks, seq, done); `failures` are raised by the first calls."""

    def __init__(self, *failures):
        self.batches = []
        self.attempts = 0
        self.failures = list(failures)
        self.lock = threading.Lock()

    def __call__(self, chunks, seq, done):
        with self.lock:
            self.attempts += 1
            if self.failures:
                raise self.failures.pop(0)
            self.batches.append((list(chunks), seq, done))

    @property
    def chunks(self):
        return [c for batch, _, _ in self.batches for c in batch]


def no_wait():
    return Backoff(sleep=lambda _: None)


def test_a_burst_of_chunks_goes_in_a_few_posts_with_consecutive_seq():
    post = RecordingPost()
    stream = ChunkStream(post, max_chunks=64, linger=0.05)

    for i in range(200):
        stream.put(f"chunk-{i}")
    stream.put("[DONE]")
    assert stream.finish(done=True)

    assert post.chunks == [f"chunk-{i}" for i in range(200)] + ["[DONE]"]
    assert len(post.batches) == 4                      # 64 + 64 + 64 + 9
    seqs = [seq for _, seq, _ in post.batches]
    sizes = [len(batch) for batch, _, _ in post.batches]
    assert seqs == [0, 64, 128, 192] and sizes == [64, 64, 64, 9]
    assert [done for _, _, done in post.batches] == [False, False, False, True]
    assert (stream.sent, stream.posts) == (201, 4)


def test_a_lone_chunk_is_posted_a_linger_after_it_arrived_not_when_the_next_comes():
    post = RecordingPost()
    stream = ChunkStream(post, linger=0.02)

    started = time.monotonic()
    stream.put("first")
    wait_for(lambda: post.batches, timeout=2, what="the first batch")
    latency = time.monotonic() - started
    stream.put("[DONE]")
    stream.finish()

    assert latency < 0.5
    assert post.batches[0] == (["first"], 0, False)
    assert post.batches[-1] == (["[DONE]"], 1, True)


def test_chunks_arriving_within_the_linger_share_a_post():
    post = RecordingPost()
    stream = ChunkStream(post, linger=0.2)

    for word in ("a", "b", "c"):
        stream.put(word)
        time.sleep(0.01)
    stream.finish()

    assert post.batches == [(["a", "b", "c"], 0, True)]


def test_a_batch_is_cut_at_max_bytes():
    post = RecordingPost()
    stream = ChunkStream(post, max_bytes=10, linger=0.05)

    for chunk in ("12345", "67890", "abc"):
        stream.put(chunk)
    stream.finish()

    assert [batch for batch, _, _ in post.batches[:2]] == [["12345", "67890"], ["abc"]]


def test_a_failed_post_is_retried_with_the_same_seq():
    post = RecordingPost(ServerUnavailable("502"), ServerUnavailable("timed out"))
    stream = ChunkStream(post, backoff=no_wait(), linger=0.05)

    stream.put("a")
    stream.put("[DONE]")
    assert stream.finish(done=True)

    assert post.attempts == 3
    assert post.batches == [(["a", "[DONE]"], 0, True)]


def test_409_on_a_retried_final_batch_means_it_already_arrived():
    post = RecordingPost(ServerUnavailable("read timed out"),
                         ServerError("already completed", status=409))
    stream = ChunkStream(post, backoff=no_wait(), linger=0.05)

    stream.put("[DONE]")

    assert stream.finish(done=True)
    assert stream.sent == 1


def test_410_stops_the_stream_and_aborts_the_backend():
    aborted = threading.Event()
    post = RecordingPost(TaskGone("client gone", status=410))
    stream = ChunkStream(post, on_gone=aborted.set, linger=0.01)

    stream.put("a")
    wait_for(aborted.is_set, what="on_gone")
    stream.put("b")

    assert stream.finish() is False
    assert post.batches == []


def test_giving_up_after_the_attempts_run_out_aborts_the_backend():
    aborted = threading.Event()
    post = RecordingPost(*[ServerUnavailable("down")] * 3)
    stream = ChunkStream(post, on_gone=aborted.set, backoff=no_wait(), max_attempts=3)

    stream.put("a")

    assert stream.finish() is False
    assert aborted.is_set() and post.attempts == 3


def test_finish_without_done_posts_only_what_is_left():
    post = RecordingPost()
    stream = ChunkStream(post, linger=0.05)
    stream.put("partial")

    stream.finish(done=False)

    assert post.batches == [(["partial"], 0, False)]


def test_cancel_drops_what_is_queued():
    post = RecordingPost()
    stream = ChunkStream(post, linger=5.0)   # the first batch is still gathering
    stream.put("never sent")

    stream.cancel()
    stream._thread.join(1)

    assert not stream._thread.is_alive()
    assert post.batches == []


def test_the_final_chunk_rides_with_done_even_after_a_pause():
    """A client must never read [DONE] before the server knows the stream
    ended: the last chunk and `done` go in one post."""
    post = RecordingPost()
    stream = ChunkStream(post, linger=0.01)
    stream.put("a")
    wait_for(lambda: post.batches, what="the first batch")
    time.sleep(0.05)   # the backend is slow to finish

    stream.finish(done=True, last="[DONE]")

    assert post.batches == [(["a"], 0, False), (["[DONE]"], 1, True)]


def test_the_final_chunk_joins_a_batch_still_gathering():
    post = RecordingPost()
    stream = ChunkStream(post, linger=1.0)
    stream.put("a")

    stream.finish(done=True, last="[DONE]")

    assert post.batches == [(["a", "[DONE]"], 0, True)]


@responses.activate
def test_a_429_on_chunks_is_retryable_not_the_end_of_the_stream():
    from publisher_client.api import SwitchboardAPI
    from tests.publisher_client.helpers import API, SERVER

    responses.post(f"{API}/tasks/t1/chunks", status=429, headers={"Retry-After": "1"},
                   json={"error": {"message": "The client is not reading the stream fast "
                                   "enough", "type": "rate_limit_error",
                                   "code": "too_many_pending", "details": {}}})
    with pytest.raises(ServerUnavailable):
        SwitchboardAPI(SERVER, "sb_token").post_chunks("t1", ["x"], seq=0)
