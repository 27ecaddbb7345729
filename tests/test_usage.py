"""Usage accounting in one process: what a reply counts, the buffer and its
writer (a real database of the test stack), and the summary read back."""
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from extensions import db
from models import ApiToken, UsageBucket
from services import metrics, usage
from tests.support import stack
from tests.support.waiting import wait_until

HOUR = 3600
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC).timestamp()  # a bucket's start


def sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def token_ids(ctx, tokens):
    return dict(db.session.execute(sa.select(ApiToken.name, ApiToken.id)).all())


def stored(ctx):
    db.session.remove()
    return [(row.bucket_start, row.llm, row.requests, row.errors, row.prompt_tokens,
             row.completion_tokens, row.estimated)
            for row in db.session.scalars(sa.select(UsageBucket).order_by(
                UsageBucket.bucket_start, UsageBucket.llm))]


# -- what a reply counts ----------------------------------------------------------

def test_a_body_counts_the_backends_usage():
    body = b'{"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}'
    assert usage.from_body(200, body) == usage.Tally(12, 5)
    assert usage.from_body(200, {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == \
        usage.Tally(3, 4)


def test_an_error_status_is_an_error_and_a_body_without_usage_counts_no_tokens():
    assert usage.from_body(502, b'{"error": {}}') == usage.Tally(error=True)
    assert usage.from_body(200, b"not json, \"usage\"") == usage.Tally()
    assert usage.from_body(200, {"usage": {"prompt_tokens": "12"}}) == usage.Tally()


def test_a_stream_with_usage_counts_it_even_split_across_reads():
    data = sse(b'{"choices": [{"delta": {"content": "a"}}]}',
               b'{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}',
               b"[DONE]")
    tally = usage.StreamTally()
    for i in range(0, len(data), 7):  # the network cuts wherever it likes
        tally.feed(data[i:i + 7])
    assert tally.result(200, {"messages": []}) == usage.Tally(9, 2)


def test_a_stream_without_usage_is_estimated_from_its_chunks_and_the_prompt():
    tally = usage.StreamTally()
    tally.feed(b": keepalive\n\n" + sse(
        b'{"choices": [{"delta": {"role": "assistant"}}]}',
        b'{"choices": [{"delta": {"content": "one"}}]}',
        b'{"choices": [{"delta": {"content": " two"}}]}', b"[DONE]"))
    body = {"messages": [{"role": "user", "content": "x" * 10},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 6}]}]}
    assert tally.result(200, body) == usage.Tally(4, 2, estimated=True)


def test_the_other_endpoints_usage_is_counted_in_their_own_names():
    embeddings = b'{"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}'
    assert usage.from_body(200, embeddings) == usage.Tally(8, 0)
    response = {"output": [], "usage": {"input_tokens": 5, "output_tokens": 3}}
    assert usage.from_body(200, response) == usage.Tally(5, 3)
    anthropic = b'{"type": "message", "usage": {"input_tokens": 11, "output_tokens": 4}}'
    assert usage.from_body(200, anthropic) == usage.Tally(11, 4)


def event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


def test_streams_of_responses_and_messages_count_their_usage_events():
    responses = usage.StreamTally()
    responses.feed(event(b"response.output_text.delta",
                         b'{"type": "response.output_text.delta", "delta": "a"}')
                   + event(b"response.completed", b'{"type": "response.completed", "response": '
                           b'{"usage": {"input_tokens": 6, "output_tokens": 1}}}'))
    assert responses.result(200, {"input": "hello"}) == usage.Tally(6, 1)
    messages = usage.StreamTally()  # Anthropic: input at the start, output at the end
    messages.feed(event(b"message_start", b'{"type": "message_start", "message": '
                        b'{"usage": {"input_tokens": 9, "output_tokens": 1}}}')
                  + event(b"content_block_delta", b'{"type": "content_block_delta", "index": 0, '
                          b'"delta": {"type": "text_delta", "text": "hi"}}')
                  + event(b"message_delta", b'{"type": "message_delta", '
                          b'"usage": {"output_tokens": 7}}'))
    assert messages.result(200, None) == usage.Tally(9, 7)


def test_streams_without_usage_of_the_other_endpoints_are_estimated_from_their_text():
    completions = usage.StreamTally()
    completions.feed(sse(b'{"choices": [{"text": "once"}]}', b'{"choices": [{"text": " upon"}]}',
                         b'{"choices": [{"text": "", "finish_reason": "stop"}]}', b"[DONE]"))
    assert completions.result(200, {"prompt": "x" * 8}) == usage.Tally(2, 2, estimated=True)
    messages = usage.StreamTally()
    messages.feed(event(b"content_block_delta", b'{"type": "content_block_delta", "delta": '
                        b'{"type": "text_delta", "text": "a"}}'))
    assert messages.result(200, {"messages": [{"role": "user", "content": "abcd"}]}) == \
        usage.Tally(1, 1, estimated=True)


def test_a_stream_that_ends_with_an_error_event_is_an_error():
    tally = usage.StreamTally()
    tally.feed(sse(b'{"error": {"message": "broke", "code": "upstream_stream_broken"}}'))
    assert tally.result(200, None).error
    assert tally.error_code == "upstream_stream_broken"


# -- the buffer and the writer ------------------------------------------------------

def test_requests_add_up_per_bucket_token_and_llm_and_are_written_in_one_flush(ctx, token_ids):
    clock = Clock()
    recorder = usage.UsageRecorder(usage.writer(ctx), flush_interval=3600, clock=clock)
    client = token_ids["client-token"]
    recorder.record(client, "a", usage.Tally(10, 2))
    recorder.record(client, "a", usage.Tally(5, 1, error=True))
    recorder.record(client, "b", usage.Tally(1, 1, estimated=True))
    clock.now += HOUR
    recorder.record(client, "a", usage.Tally(7, 7))
    assert recorder.flush() == 3
    start = datetime(2026, 12, 1, 10, 0)
    assert stored(ctx) == [(start, "a", 2, 1, 15, 3, False), (start, "b", 1, 0, 1, 1, True),
                           (start + timedelta(hours=1), "a", 1, 0, 7, 7, False)]
    recorder.record(client, "a", usage.Tally(1, 1))  # a later flush adds to the row
    recorder.close()
    assert stored(ctx)[-1] == (start + timedelta(hours=1), "a", 2, 0, 8, 8, False)


def test_a_failed_write_keeps_its_rows_for_the_next_flush(ctx, token_ids):
    failing = [True]
    real = usage.writer(ctx)

    def write(rows):
        if failing[0]:
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        real(rows)

    recorder = usage.UsageRecorder(write, flush_interval=3600, clock=Clock())
    recorder.record(token_ids["client-token"], "a", usage.Tally(3, 4))
    assert recorder.flush() == 0
    recorder.record(token_ids["client-token"], "a", usage.Tally(1, 1))
    failing[0] = False
    assert recorder.flush() == 1
    assert [row[2:6] for row in stored(ctx)] == [(2, 0, 4, 5)]
    recorder.close()


@stack.only_on(db="sqlite")
def test_a_flush_gives_up_soon_on_a_locked_database_and_keeps_its_rows(ctx, token_ids):
    recorder = usage.UsageRecorder(usage.writer(ctx), flush_interval=3600, clock=Clock())
    recorder.record(token_ids["client-token"], "a", usage.Tally(3, 4))
    path = sa.engine.make_url(ctx.config["SQLALCHEMY_DATABASE_URI"]).database
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write (a gc-sweep, say)
    try:
        started = time.monotonic()
        assert recorder.flush() == 0
        assert time.monotonic() - started < 1.0  # not SQLITE_BUSY_TIMEOUT's 2 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert recorder.flush() == 1
    assert [row[2:6] for row in stored(ctx)] == [(1, 0, 3, 4)]
    recorder.close()


def test_a_full_buffer_drops_new_rows_and_counts_them(ctx, token_ids):
    dropped = metrics.usage_dropped_total._value.get()
    recorder = usage.UsageRecorder(lambda rows: None, max_pending=2, flush_interval=3600,
                                   clock=Clock())
    for llm in ("a", "b", "c", "d"):
        recorder.record(token_ids["client-token"], llm, usage.Tally(1, 1))
    recorder.record(token_ids["client-token"], "a", usage.Tally(1, 1))  # an old row still adds
    assert recorder.pending() == 2
    assert metrics.usage_dropped_total._value.get() - dropped == 2
    recorder.close()


def test_the_background_writer_flushes_and_stops_on_close(ctx, token_ids):
    recorder = usage.UsageRecorder(usage.writer(ctx), flush_interval=0.05, clock=Clock())
    recorder.record(token_ids["client-token"], "a", usage.Tally(2, 3))
    wait_until(lambda: stored(ctx), message="the background flush")
    thread = recorder._thread
    recorder.close()
    assert not thread.is_alive()


# -- the summary ------------------------------------------------------------------------

def test_the_summary_adds_up_the_buckets_that_overlap_the_window(ctx, token_ids):
    recorder = usage.UsageRecorder(usage.writer(ctx), flush_interval=3600, clock=Clock())
    client, admin = token_ids["client-token"], token_ids["admin-token"]
    for hours, token, llm, tally in ((0, client, "a", usage.Tally(1, 2)),
                                     (1, client, "a", usage.Tally(10, 20, estimated=True)),
                                     (1, admin, "a", usage.Tally(5, 5, error=True)),
                                     (5, client, "a", usage.Tally(100, 100))):
        recorder.clock.now = T0 + hours * HOUR + 60
        recorder.record(token, llm, tally)
    recorder.close()
    since = datetime(2026, 12, 1, 10, 30)  # inside the first bucket: it counts whole
    rows = usage.summary(db.session, since, since + timedelta(hours=2))
    assert rows == [
        {"token": "admin-token", "llm": "a", "requests": 1, "errors": 1, "prompt_tokens": 5,
         "completion_tokens": 5, "estimated": False},
        {"token": "client-token", "llm": "a", "requests": 2, "errors": 0, "prompt_tokens": 11,
         "completion_tokens": 22, "estimated": True}]
    mine = usage.summary(db.session, since, since + timedelta(hours=2), token=client)
    assert [row["token"] for row in mine] == ["client-token"]
    assert usage.summary(db.session, since + timedelta(hours=2),
                         since + timedelta(hours=3)) == []


# -- the endpoint's query -----------------------------------------------------------------

def test_the_usage_query_is_validated(client, auth):
    for query in ("since=yesterday", "until=2026-13-01T00:00:00Z",
                  "since=2026-12-02T00:00:00Z&until=2026-12-01T00:00:00Z"):
        response = client.get(f"/api/v1/usage?{query}", headers=auth("client"))
        assert response.status_code == 400, query
        assert response.json["error"]["code"] == "validation_failed"
    assert client.get("/api/v1/usage?since=2026-12-01T00:00:00%2B01:00",
                      headers=auth("client")).json == []
    assert client.get("/api/v1/usage").status_code == 401
