"""The task bus contract, on both buses: ordering, deadlines, cleanup on every path.

Every test runs on the in-memory bus and, in the Redis half of `make test`, on
the Redis bus too (tests/support/buses.py);
tests/test_redis_bus.py has what only Redis has: several workers, dead workers,
outages."""
import threading
import time

import pytest

from services.errors import (BadGateway, Conflict, Forbidden, GatewayTimeout, Gone, NotFound,
                             TooManyRequests, Unavailable)
from services.bus.base import Delivery, RoutesChanged
from tests.support import stack
from tests.support.buses import Buses
from tests.support.waiting import wait_until

SID = "session-1"
INFER = {"kind": "infer", "llm": "m", "streaming": False, "body": {}}
STREAM = {**INFER, "streaming": True}


# The Redis half of `make test` runs the contract on both buses; the quick
# half (SQLite + memory) needs no Redis.
@pytest.fixture(params=["memory", "redis"] if stack.BUS == "redis" else ["memory"])
def buses(request):
    buses = Buses(request.param, session_liveness=0.5)
    yield buses
    assert not buses.close(), "Redis keys without a TTL"


@pytest.fixture
def bus(buses):
    bus = buses.make()
    yield bus
    # Whatever the test did, nothing may stay behind once every task is released.
    stats = bus.stats()
    assert stats["tasks"] == stats["shared"] == stats["pending"] == 0, stats


def submit(bus, task=INFER, **kwargs):
    args = {"llm": "m", "owner": "tok", "limit": 10, "pickup_timeout": 5.0, "timeout": 5.0, **kwargs}
    return bus.submit(SID, dict(task), **args)


def later(delay, fn, *args):
    timer = threading.Timer(delay, fn, args)
    timer.start()
    return timer


def test_poll_hands_over_queued_tasks_with_their_ids(bus):
    task_id = submit(bus)
    tasks = bus.poll(SID, wait=0)
    assert tasks == [{"task_id": task_id, **INFER, "attempt": 1}]
    bus.release(task_id)


def test_held_poll_returns_as_soon_as_a_task_arrives(bus):
    box = {}
    poller = threading.Thread(target=lambda: box.setdefault("tasks", bus.poll(SID, wait=5)))
    poller.start()
    wait_until(lambda: bus.is_live(SID), message="the poll is held")
    started = time.monotonic()
    task_id = submit(bus)
    poller.join(5)
    assert time.monotonic() - started < 2
    assert [t["task_id"] for t in box["tasks"]] == [task_id]
    bus.release(task_id)


def test_empty_poll_returns_after_its_wait(bus):
    started = time.monotonic()
    assert bus.poll(SID, wait=0.2) == []
    assert 0.15 < time.monotonic() - started < 2


def test_outcome_reaches_the_waiting_client(bus):
    with bus.open_task(SID, INFER, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        later(0.05, bus.complete, task_id, {"status": 200, "body": {"ok": True}})
        assert bus.wait_result(task_id) == {"status": 200, "body": {"ok": True}}


def test_task_not_picked_up_in_time_is_a_504_and_leaves_the_queue(bus):
    with bus.open_task(SID, INFER, llm="m", owner="tok", limit=10, pickup_timeout=0.1, timeout=5) as task_id:
        with pytest.raises(GatewayTimeout) as err:
            bus.wait_result(task_id)
        assert err.value.code == "pickup_timeout"
    assert bus.poll(SID, wait=0) == []


def test_task_not_finished_in_time_is_a_504_and_cancels_the_publisher(bus):
    with bus.open_task(SID, INFER, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=0.1) as task_id:
        bus.poll(SID, wait=0)
        with pytest.raises(GatewayTimeout) as err:
            bus.wait_result(task_id)
        assert err.value.code == "task_timeout"
    assert bus.poll(SID, wait=0) == [{"kind": "cancel", "task_id": task_id}]
    with pytest.raises(Gone):
        bus.complete(task_id, {"status": 200, "body": {}})


def test_wait_result_returns_none_at_the_keepalive_interval(bus):
    with bus.open_task(SID, INFER, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        assert bus.wait_result(task_id, poll_interval=0.05) is None


def test_chunks_arrive_in_order_and_done_marker_ends_the_stream(bus):
    with bus.open_task(SID, STREAM, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        bus.push_chunks(task_id, ["a", "b"], seq=None, done=False)
        bus.push_chunks(task_id, ["c", "[DONE]", "ignored"], seq=None, done=False)
        assert bus.next_chunks(task_id, idle_timeout=5, poll_interval=1) == (
            ["a", "b", "c"], True, None)
        with pytest.raises(Conflict):
            bus.push_chunks(task_id, ["late"], seq=None, done=False)


def test_retried_chunk_batch_is_not_duplicated(bus):
    with bus.open_task(SID, STREAM, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        bus.push_chunks(task_id, ["a", "b"], seq=0, done=False)
        bus.push_chunks(task_id, ["a", "b", "c"], seq=0, done=False)  # a retry that grew
        bus.push_chunks(task_id, ["c", "d"], seq=2, done=True)
        bus.push_chunks(task_id, ["c", "d"], seq=2, done=True)  # retried final batch: accepted
        assert bus.next_chunks(task_id, 5, 1) == (["a", "b", "c", "d"], True, None)


def test_chunk_batch_leaving_a_gap_is_refused(bus):
    with bus.open_task(SID, STREAM, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        with pytest.raises(Conflict) as err:
            bus.push_chunks(task_id, ["x"], seq=3, done=False)
        assert err.value.details == {"expected_seq": 0}


def test_silent_stream_times_out(bus):
    with bus.open_task(SID, STREAM, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        bus.push_chunks(task_id, ["a"], seq=None, done=False)
        assert bus.next_chunks(task_id, 0.1, 1)[0] == ["a"]
        with pytest.raises(GatewayTimeout) as err:
            bus.next_chunks(task_id, 0.1, 1)
        assert err.value.code == "stream_idle_timeout"


def test_client_going_away_cancels_a_picked_task(bus):
    task_id = submit(bus)
    bus.poll(SID, wait=0)
    bus.release(task_id)
    with pytest.raises(Gone):
        bus.push_chunks(task_id, ["a"], seq=None, done=False)
    assert bus.poll(SID, wait=0) == [{"kind": "cancel", "task_id": task_id}]


def test_client_going_away_before_pickup_just_drops_the_task(bus):
    bus.release(submit(bus))
    assert bus.poll(SID, wait=0) == []


def test_completed_task_answers_conflict_and_unknown_task_not_found(bus):
    with bus.open_task(SID, INFER, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        bus.complete(task_id, {"status": 200, "body": None})
        with pytest.raises(Conflict):
            bus.complete(task_id, {"status": 200, "body": None})
    with pytest.raises(Conflict):  # after release too
        bus.complete(task_id, {"status": 200, "body": None})
    with pytest.raises(NotFound):
        bus.complete("no-such-task", {"status": 200, "body": None})


def test_dropping_a_session_fails_its_in_flight_tasks(bus):
    with bus.open_task(SID, INFER, llm="m", owner="tok", limit=10, pickup_timeout=5, timeout=5) as task_id:
        bus.poll(SID, wait=0)
        later(0.05, bus.drop_session, SID, "publisher disconnected")
        with pytest.raises(Unavailable, match="publisher disconnected"):
            bus.wait_result(task_id)
    assert not bus.is_live(SID)


def test_dropping_a_session_ends_its_held_poll(bus):
    box = {}
    poller = threading.Thread(target=lambda: box.setdefault("tasks", bus.poll(SID, wait=5)))
    poller.start()
    wait_until(lambda: bus.is_live(SID), message="the poll is held")
    started = time.monotonic()
    bus.drop_session(SID, "publisher disconnected")
    poller.join(5)
    assert box["tasks"] == []
    assert time.monotonic() - started < 2
    assert not bus.is_live(SID)


def test_shared_key_joins_the_task_in_flight(bus):
    wake = {"kind": "wake", "llm": "m"}
    first = submit(bus, wake, share_key="wake:m")
    second = submit(bus, wake, share_key="wake:m")
    assert first == second
    assert len(bus.poll(SID, wait=0)) == 1
    bus.complete(first, {"status": 200, "body": {"ok": True}})
    assert bus.wait_result(first) == bus.wait_result(second) == {"status": 200,
                                                                 "body": {"ok": True}}
    bus.release(first)
    bus.release(second)


def test_pending_limit_per_llm_is_a_429(bus):
    ids = [submit(bus, limit=2) for _ in range(2)]
    with pytest.raises(TooManyRequests) as err:
        submit(bus, limit=2)
    assert err.value.headers == {"Retry-After": "1"}
    submit_other = bus.submit(SID, dict(INFER), llm="other", owner="tok", limit=2, pickup_timeout=5,
                              timeout=5)
    for task_id in [*ids, submit_other]:
        bus.release(task_id)


def test_session_is_live_while_polling_and_shortly_after(bus):
    assert not bus.is_live(SID)
    poller = threading.Thread(target=bus.poll, args=(SID, 0.3))
    poller.start()
    wait_until(lambda: bus.is_live(SID), message="live while the poll is held")
    poller.join()
    ended = time.monotonic()
    assert bus.is_live(SID)  # ended less than SESSION_LIVENESS (0.5 s) ago
    wait_until(lambda: not bus.is_live(SID), timeout=3, message="no longer live")
    assert time.monotonic() - ended >= 0.25


def test_hundred_concurrent_waiters_each_get_their_own_outcome(bus):
    results = {}

    def client(n):
        with bus.open_task(SID, {**INFER, "body": {"n": n}}, llm="m", owner="tok", limit=200,
                           pickup_timeout=5, timeout=5) as task_id:
            results[n] = bus.wait_result(task_id)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(100)]
    for thread in clients:
        thread.start()
    answered = 0
    deadline = time.monotonic() + 10
    while answered < 100 and time.monotonic() < deadline:
        for task in bus.poll(SID, wait=0.5):
            bus.complete(task["task_id"], {"status": 200, "body": task["body"]})
            answered += 1
    for thread in clients:
        thread.join(5)
    assert results == {n: {"status": 200, "body": {"n": n}} for n in range(100)}


def test_poll_whose_publisher_hung_up_leaves_the_task_queued(bus):
    task_id = submit(bus)
    assert bus.poll(SID, wait=0, connected=lambda: False) == []
    assert [t["task_id"] for t in bus.poll(SID, wait=0, connected=lambda: True)] == [task_id]
    bus.release(task_id)


def test_chunks_cannot_finish_a_task_that_is_not_a_stream(bus):
    wake = submit(bus, {"kind": "wake", "llm": "m"})
    infer = submit(bus)  # streaming: False
    bus.poll(SID, wait=0)
    for task_id in (wake, infer):
        with pytest.raises(Conflict) as err:
            bus.push_chunks(task_id, [], seq=None, done=True)
        assert err.value.code == "not_a_stream"
        bus.complete(task_id, {"status": 200, "body": {}})
        assert bus.wait_result(task_id, poll_interval=0.1) == {"status": 200, "body": {}}
        bus.release(task_id)


def test_empty_final_batch_with_seq_ends_the_stream(bus):
    task_id = submit(bus, STREAM)
    bus.poll(SID, wait=0)
    bus.push_chunks(task_id, ["a"], seq=0, done=False)
    bus.push_chunks(task_id, [], seq=1, done=True)
    assert bus.next_chunks(task_id, 5, 1) == (["a"], True, None)
    bus.release(task_id)


def test_another_owner_is_refused_before_the_task_state_shows(bus):
    task_id = submit(bus)
    bus.poll(SID, wait=0)
    with pytest.raises(Forbidden):
        bus.task_info(task_id, owner="someone-else")
    bus.complete(task_id, {"status": 200, "body": {}})
    bus.release(task_id)
    with pytest.raises(Forbidden):  # finished: still 403 for a stranger, 409 for the owner
        bus.task_info(task_id, owner="someone-else")
    with pytest.raises(Conflict):
        bus.task_info(task_id, owner="tok")


def test_slots_and_tasks_count_against_one_limit_per_llm(bus):
    slot = bus.acquire_slot("m", 2)
    task_id = submit(bus, limit=2)
    with pytest.raises(TooManyRequests):
        bus.acquire_slot("m", 2)
    with pytest.raises(TooManyRequests):
        submit(bus, limit=2)
    bus.release_slot(slot)
    bus.release_slot(bus.acquire_slot("m", 2))  # the freed slot is usable again
    bus.release(task_id)


def test_a_slot_asked_at_an_old_routes_version_is_refused_and_counts_nothing(bus):
    seen = bus.routes_version()
    bus.release_slot(bus.acquire_slot("m", 1, routes_version=seen))
    bus.routes_changed()
    assert bus.routes_version() != seen
    with pytest.raises(RoutesChanged):
        bus.acquire_slot("m", 1, routes_version=seen)
    slot = bus.acquire_slot("m", 1, routes_version=bus.routes_version())  # the only one
    with pytest.raises(TooManyRequests):
        bus.acquire_slot("m", 1)
    bus.release_slot(slot)


def test_a_poll_hands_out_at_most_64_tasks(bus):
    ids = [submit(bus, limit=100) for _ in range(70)]
    assert len(bus.poll(SID, wait=0)) == 64
    assert len(bus.poll(SID, wait=0)) == 6
    for task_id in ids:
        bus.release(task_id)


def test_posts_of_another_owner_are_forbidden(bus):
    task_id = submit(bus, STREAM)
    bus.poll(SID, wait=0)
    with pytest.raises(Forbidden):
        bus.push_chunks(task_id, ["a"], seq=0, done=False, owner="someone-else")
    with pytest.raises(Forbidden):
        bus.complete(task_id, {"status": 200, "body": {}}, owner="someone-else")
    bus.push_chunks(task_id, ["a"], seq=0, done=True, owner="tok")
    assert bus.next_chunks(task_id, 5, 1) == (["a"], True, None)
    bus.release(task_id)


def test_waiters_of_a_shared_task_each_raise_their_own_error(bus):
    wake = {"kind": "wake", "llm": "m"}
    first = submit(bus, wake, share_key="wake:m", pickup_timeout=0.1)
    second = submit(bus, wake, share_key="wake:m", pickup_timeout=0.1)
    errors = []
    for task_id in (first, second):
        with pytest.raises(GatewayTimeout) as err:
            bus.wait_result(task_id)
        errors.append(err.value)
    assert errors[0] is not errors[1]
    assert [e.code for e in errors] == ["pickup_timeout", "pickup_timeout"]
    bus.release(first)
    bus.release(second)


def test_a_late_post_after_the_stream_ended_is_a_conflict_but_a_retry_is_accepted(bus):
    task_id = submit(bus, STREAM)
    bus.poll(SID, wait=0)
    bus.push_chunks(task_id, ["a", "[DONE]"], seq=0, done=False)
    bus.push_chunks(task_id, ["a", "[DONE]"], seq=0, done=False)  # the same batch again
    with pytest.raises(Conflict):
        bus.push_chunks(task_id, ["b"], seq=2, done=False)
    assert bus.next_chunks(task_id, 5, 1) == (["a"], True, None)
    bus.release(task_id)



# -- many streams of one session in one call --------------------------------------

def entry(task_id, chunks, seq=None, done=False):
    return {"task_id": task_id, "chunks": chunks, "seq": seq, "done": done}


def codes(results):
    return [None if r is None else (r["status"], r["code"]) for r in results]


def test_a_batch_reports_each_task_on_its_own(bus):
    live, finished, cancelled, foreign, elsewhere = (submit(bus, STREAM) for _ in range(5))
    other_session = bus.submit("session-2", dict(STREAM), llm="m", owner="tok", limit=10,
                               pickup_timeout=5.0, timeout=5.0)
    bus.poll(SID, wait=0)
    bus.poll("session-2", wait=0)
    bus.push_chunks(finished, ["f", "[DONE]"], seq=0, done=False)
    bus.release(cancelled)
    results = bus.push_chunks_batch(SID, [
        entry(live, ["a", "b"], seq=0),
        entry(finished, ["late"], seq=2),
        entry(cancelled, ["c"], seq=0),
        entry("no-such-task", ["x"], seq=0),
        entry(other_session, ["o"], seq=0),
        entry(finished, ["f", "[DONE]"], seq=0),  # a retry of what it has: accepted
        entry(live, ["b", "c"], seq=1, done=True),
    ], owner="tok")
    assert codes(results) == [None, (409, "task_completed"), (410, "task_cancelled"),
                              (404, "task_not_found"), (403, "foreign_task"), None, None]
    assert codes(bus.push_chunks_batch(SID, [entry(foreign, ["x"], seq=0)],
                                       owner="someone-else")) == [(403, "foreign_task")]
    assert bus.next_chunks(live, 5, 1) == (["a", "b", "c"], True, None)
    assert bus.next_chunks(finished, 5, 1) == (["f"], True, None)
    assert bus.next_chunks(other_session, 5, 0.05) == ([], False, None)
    bus.push_chunks_batch("session-2", [entry(other_session, ["o"], seq=0, done=True)])
    assert bus.next_chunks(other_session, 5, 1) == (["o"], True, None)
    for task_id in (live, finished, foreign, elsewhere, other_session):
        bus.release(task_id)


def test_a_batch_keeps_seq_dedupe_gaps_and_the_done_marker(bus):
    first, second = submit(bus, STREAM), submit(bus, STREAM)
    bus.poll(SID, wait=0)
    assert bus.push_chunks_batch(SID, [entry(first, ["a", "b"], seq=0),
                                       entry(second, ["x"], seq=0)]) == [None, None]
    results = bus.push_chunks_batch(SID, [
        entry(first, ["a", "b", "c"], seq=0),       # a retry that grew
        entry(second, ["z"], seq=5),                # a gap
        entry(second, ["y", "[DONE]", "ignored"], seq=1)])
    assert codes(results) == [None, (409, "seq_gap"), None]
    assert results[1]["details"] == {"expected_seq": 1}
    assert bus.next_chunks(first, 5, 1) == (["a", "b", "c"], False, None)
    assert bus.next_chunks(second, 5, 1) == (["x", "y"], True, None)
    assert bus.push_chunks_batch(SID, []) == []
    bus.release(first)
    bus.release(second)


def test_a_batch_acknowledges_its_tasks(buses):
    bus = buses.make(delivery=Delivery(ack_timeout=0.3, max_attempts=2, lost_timeout=60.0,
                                       max_polls=2))
    stream = submit(bus, STREAM)
    bus.poll(SID, wait=0, ack=[])
    assert bus.push_chunks_batch(SID, [entry(stream, ["a"], seq=0)]) == [None]
    assert bus.next_chunks(stream, 5, 0.8) == (["a"], False, None)
    assert bus.next_chunks(stream, 5, 0.5) == ([], False, None)  # past the ack timeout
    assert bus.poll(SID, wait=0, ack=[]) == []
    bus.release(stream)


# -- delivery: acknowledgements, redelivery, lost publishers, the poll cap --------

QUICK = Delivery(ack_timeout=0.3, max_attempts=2, lost_timeout=60.0, max_polls=2)


def test_an_unacknowledged_task_is_delivered_again_first_with_its_next_attempt(buses):
    bus = buses.make(delivery=QUICK)
    first, second = submit(bus), submit(bus)
    delivered = bus.poll(SID, wait=0, ack=[])  # an acknowledging session
    assert [(t["task_id"], t["attempt"]) for t in delivered] == [(first, 1), (second, 1)]
    bus.poll(SID, wait=0, ack=[second])  # the first one's ack never comes
    waiter = threading.Thread(target=bus.wait_result, args=(first, 0.5))  # time moves it
    waiter.start()
    again = bus.poll(SID, wait=2, ack=[])
    waiter.join()
    assert [(t["task_id"], t["attempt"]) for t in again] == [(first, 2)]
    bus.complete(first, {"status": 200, "body": {"n": 1}})
    assert bus.wait_result(first) == {"status": 200, "body": {"n": 1}}
    bus.release(first)
    bus.release(second)


def test_after_the_last_attempt_the_client_gets_504_and_the_publisher_410(buses):
    bus = buses.make(delivery=QUICK)  # two deliveries, 0.3 s each to acknowledge
    task_id = submit(bus)
    assert [t["attempt"] for t in bus.poll(SID, wait=0, ack=[])] == [1]
    assert bus.wait_result(task_id, poll_interval=0.6) is None  # queued again meanwhile
    assert [t["attempt"] for t in bus.poll(SID, wait=0, ack=[])] == [2]
    with pytest.raises(GatewayTimeout) as err:
        bus.wait_result(task_id)
    assert err.value.code == "task_not_acknowledged"
    with pytest.raises(Gone):
        bus.complete(task_id, {"status": 200, "body": {}})
    assert bus.poll(SID, wait=0, ack=[]) == [{"kind": "cancel", "task_id": task_id}]
    bus.release(task_id)


def test_an_acknowledged_task_is_never_delivered_again(buses):
    bus = buses.make(delivery=QUICK)
    task_id = submit(bus)
    bus.poll(SID, wait=0, ack=[])
    bus.poll(SID, wait=0, ack=[task_id, "no-such-task"])
    assert bus.wait_result(task_id, poll_interval=0.8) is None  # past the ack timeout
    assert bus.poll(SID, wait=0, ack=[]) == []
    bus.complete(task_id, {"status": 200, "body": {}})
    bus.release(task_id)


def test_a_result_or_chunks_acknowledge_the_task(buses):
    bus = buses.make(delivery=QUICK)
    stream = submit(bus, STREAM)
    bus.poll(SID, wait=0, ack=[])
    bus.push_chunks(stream, ["a"], seq=0, done=False)
    assert bus.next_chunks(stream, 5, 0.8) == (["a"], False, None)
    assert bus.next_chunks(stream, 5, 0.5) == ([], False, None)  # past the ack timeout
    assert bus.poll(SID, wait=0, ack=[]) == []
    bus.release(stream)


def test_a_session_that_never_acknowledges_gets_no_redelivery(buses):
    bus = buses.make(delivery=QUICK)
    task_id = submit(bus)
    assert len(bus.poll(SID, wait=0)) == 1
    assert bus.wait_result(task_id, poll_interval=0.8) is None
    assert bus.poll(SID, wait=0) == []
    bus.complete(task_id, {"status": 200, "body": {}})
    assert bus.wait_result(task_id) == {"status": 200, "body": {}}
    bus.release(task_id)


def test_a_late_acknowledgement_takes_a_requeued_task_back(buses):
    bus = buses.make(delivery=QUICK)
    task_id = submit(bus)
    bus.poll(SID, wait=0, ack=[])
    assert bus.wait_result(task_id, poll_interval=0.8) is None  # requeued meanwhile
    assert bus.poll(SID, wait=0, ack=[task_id]) == []  # the publisher had it after all
    bus.complete(task_id, {"status": 200, "body": {}})
    assert bus.wait_result(task_id) == {"status": 200, "body": {}}
    bus.release(task_id)


def test_acknowledging_another_sessions_task_acknowledges_nothing(buses):
    bus = buses.make(delivery=QUICK)
    task_id = submit(bus)
    bus.poll(SID, wait=0, ack=[])
    bus.poll("someone-else", wait=0, ack=[task_id])
    assert bus.wait_result(task_id, poll_interval=0.8) is None
    assert [t["attempt"] for t in bus.poll(SID, wait=0, ack=[])] == [2]
    bus.release(task_id)


def test_a_lost_publisher_fails_its_tasks_at_once(buses):
    bus = buses.make(delivery=Delivery(lost_timeout=0.5))
    picked = submit(bus, STREAM)
    bus.poll(SID, wait=0)  # the publisher dies now: no poll, heartbeat or post any more
    queued = submit(bus)
    started = time.monotonic()
    with pytest.raises(BadGateway) as err:
        while True:
            bus.next_chunks(picked, idle_timeout=30, poll_interval=5)
    assert err.value.code == "publisher_lost"
    assert time.monotonic() - started < 2
    with pytest.raises(BadGateway):
        bus.wait_result(queued)
    with pytest.raises(Gone):
        bus.push_chunks(picked, ["late"], seq=0, done=False)
    bus.release(picked)
    bus.release(queued)


def test_heartbeats_and_held_polls_keep_a_publisher_from_being_lost(buses):
    bus = buses.make(delivery=Delivery(lost_timeout=0.5))
    task_id = submit(bus)
    bus.poll(SID, wait=0)
    for _ in range(4):  # a long task, heartbeating
        bus.seen(SID)
        assert bus.wait_result(task_id, poll_interval=0.3) is None
    poller = threading.Thread(target=bus.poll, args=(SID, 1.2))
    poller.start()
    wait_until(lambda: bus.stats()["polls"] == 1 or bus.is_live(SID))
    assert bus.wait_result(task_id, poll_interval=1.0) is None  # a held poll is life too
    poller.join()
    bus.complete(task_id, {"status": 200, "body": {}})
    bus.release(task_id)


def test_polls_past_the_cap_are_429(buses):
    bus = buses.make(delivery=QUICK)  # max_polls=2
    pollers = [threading.Thread(target=bus.poll, args=(SID, 1.0)) for _ in range(2)]
    for poller in pollers:
        poller.start()
    wait_until(lambda: _held(bus, 2), message="two polls held")
    with pytest.raises(TooManyRequests) as err:
        bus.poll(SID, wait=0)
    assert err.value.code == "too_many_polls"
    assert err.value.headers == {"Retry-After": "1"}
    for poller in pollers:
        poller.join()
    assert bus.poll(SID, wait=0) == []  # room again


def test_a_poll_whose_publisher_hung_up_stops_being_held(buses):
    bus = buses.make(delivery=QUICK)
    hung_up = threading.Event()
    box = {}
    poller = threading.Thread(target=lambda: box.setdefault(
        "tasks", bus.poll(SID, 20, connected=lambda: not hung_up.is_set())))
    poller.start()
    wait_until(lambda: _held(bus, 1), message="the poll is held")
    hung_up.set()
    started = time.monotonic()
    poller.join(5)
    assert box["tasks"] == []
    assert time.monotonic() - started < 3  # within the 2 s connection check


def _held(bus, count) -> bool:
    return bus.stats()["polls"] == count


def test_a_task_that_requires_a_live_session_is_refused_without_one(bus):
    with pytest.raises(Unavailable) as err:
        submit(bus, require_live=True)
    assert err.value.code == "publisher_offline"
    bus.touch(SID)  # it registered: live for SESSION_LIVENESS
    task_id = submit(bus, require_live=True)
    assert [t["task_id"] for t in bus.poll(SID, wait=0)] == [task_id]
    bus.release(task_id)


def test_an_infer_result_completes_at_once_but_a_wake_waits_for_its_caller(bus):
    infer, wake = submit(bus), submit(bus, {"kind": "wake", "llm": "m"})
    bus.poll(SID, wait=0)
    assert bus.complete(infer, {"status": 200, "body": {}}, unless_kind="wake") is None
    info = bus.complete(wake, {"status": 200, "body": {}}, unless_kind="wake")
    assert (info["task_id"], info["kind"], info["llm"]) == (wake, "wake", "m")
    assert bus.wait_result(wake, poll_interval=0.1) is None  # still open
    bus.complete(wake, {"status": 200, "body": {}})
    assert bus.wait_result(wake) == bus.wait_result(infer) == {"status": 200, "body": {}}
    bus.release(infer)
    bus.release(wake)


def test_gauges_count_what_waits_what_runs_and_the_polls_held(buses):
    bus = buses.make(delivery=QUICK)
    assert bus.gauges() == {"tasks_waiting": {}, "tasks_in_flight": {}, "held_polls": 0,
                            "live_sessions": 0, "redeliveries": 0}
    picked = submit(bus)
    bus.poll(SID, wait=0, ack=[])
    queued = submit(bus)
    other = bus.submit(SID, dict(INFER), llm="other", owner="tok", limit=5, pickup_timeout=5,
                       timeout=5)
    poller = threading.Thread(target=bus.poll, args=("session-2", 1.0))
    poller.start()
    wait_until(lambda: bus.gauges()["held_polls"] == 1, message="the poll is counted")
    gauges = bus.gauges()
    assert gauges["tasks_waiting"] == {"m": 1, "other": 1}
    assert gauges["tasks_in_flight"] == {"m": 1}
    assert gauges["live_sessions"] == 2
    assert bus.wait_result(picked, poll_interval=0.8) is None  # not acknowledged: again
    assert bus.gauges()["redeliveries"] == 1
    poller.join()
    for task_id in (picked, queued, other):
        bus.release(task_id)
    gauges = bus.gauges()
    assert (gauges["tasks_waiting"], gauges["tasks_in_flight"]) == ({}, {})
