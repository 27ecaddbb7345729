"""What only the Redis bus has: several workers sharing one Redis, workers that
die, Redis going away and coming back, wall-clock deadlines.

Each `buses.make()` is one worker process's bus (its own pub/sub listener and
heartbeat), all on one key prefix, as the workers of several hosts are.
"""
import threading
import time
from urllib.parse import urlsplit

import pytest
import redis

from services.bus.base import RoutesChanged
from services.errors import GatewayTimeout, Gone, TooManyRequests, Unavailable
from tests.support import stack
from tests.support.buses import Buses
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = stack.only_on(bus="redis")

SID = "session-1"
INFER = {"kind": "infer", "llm": "m", "streaming": False, "body": {}}
STREAM = {**INFER, "streaming": True}
ARGS = {"llm": "m", "owner": "tok", "limit": 10, "pickup_timeout": 5.0, "timeout": 5.0}


@pytest.fixture
def buses():
    buses = Buses("redis", session_liveness=0.5)
    yield buses
    assert not buses.close(), "Redis keys without a TTL"


def in_background(fn, *args):
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def held_poll(bus, wait=5.0):
    """A poll held on `bus` in the background, once it counts as live everywhere."""
    thread, box = in_background(bus.poll, SID, wait)
    wait_until(lambda: bus.is_live(SID), message="the poll is held")
    return thread, box


def record_scripts(bus):
    """The scripts `bus` runs from now on, in order (the heartbeat's left out)."""
    calls = []
    run = bus._run

    def recorded(script, *args):
        if script != "heartbeat":
            calls.append(script)
        return run(script, *args)

    bus._run = recorded
    return calls


# -- a client on one worker, the publisher on another --------------------------

def test_a_chunk_batch_of_many_streams_is_one_script_call_and_reaches_other_workers(buses):
    client_side, publisher_side = buses.make(), buses.make()
    streams = [client_side.submit(SID, dict(STREAM), **{**ARGS, "limit": 100})
               for _ in range(20)]
    publisher_side.poll(SID, wait=0)
    calls = record_scripts(publisher_side)
    assert publisher_side.push_chunks_batch(SID, [
        {"task_id": task_id, "chunks": [f"{task_id}-a", f"{task_id}-b"], "seq": 0,
         "done": True} for task_id in streams]) == [None] * 20
    assert calls == ["push_chunks_batch"]
    for task_id in streams:
        assert client_side.next_chunks(task_id, 5, 1) == (
            [f"{task_id}-a", f"{task_id}-b"], True, None)
        client_side.release(task_id)

def test_a_waiting_client_gets_its_answer_with_the_news_of_its_end_and_reads_nothing(buses):
    client_side, publisher_side = buses.make(), buses.make()
    listening = client_side._waiters.add("probe")  # set once its listener has subscribed
    client_side.is_live(SID)  # its first call starts the listener
    assert listening.wait(5)
    task_id = client_side.submit(SID, dict(INFER), **{**ARGS, "limit": 1})
    publisher_side.poll(SID, wait=0)
    calls = record_scripts(client_side)
    waiter, box = in_background(client_side.wait_result, task_id)
    publisher_side.complete(task_id, {"status": 200, "body": {"ok": True}}, owner="tok")
    waiter.join(5)
    assert box["value"] == {"status": 200, "body": {"ok": True}}
    assert calls == []
    # The finished request no longer counts at the LLM, although it holds its task still.
    publisher_side.release(publisher_side.submit(SID, dict(INFER), **{**ARGS, "limit": 1}))
    client_side.release(task_id)  # after its answer went out: let go of, in a batch
    wait_until(lambda: client_side.client.hlen(f"{buses.prefix}h:{task_id}") == 0,
               message="the task let go of")
    assert calls == ["release_many"]


def test_a_client_that_missed_the_news_reads_its_answer_and_frees_it_in_one_script_call(buses):
    client_side, publisher_side = buses.make(), buses.make()
    task_id = client_side.submit(SID, dict(INFER), **{**ARGS, "limit": 1})
    client_side._hear = lambda message: None  # its listener hears nothing ...
    publisher_side.poll(SID, wait=0)
    publisher_side.complete(task_id, {"status": 200, "body": {"ok": True}}, owner="tok")
    client_side._waiters.notify_all()  # ... then wakes everyone, as after a reconnect
    calls = record_scripts(client_side)
    assert client_side.wait_result(task_id) == {"status": 200, "body": {"ok": True}}
    assert client_side.wait_result(task_id) == {"status": 200, "body": {"ok": True}}  # again
    client_side.release(task_id)
    assert calls == ["observe"]
    assert client_side.client.hlen(f"{buses.prefix}h:{task_id}") == 0


def test_a_poll_that_finds_a_task_takes_it_and_ends_in_one_script_call(buses):
    client_side, publisher_side = buses.make(), buses.make()
    with client_side.open_task(SID, dict(INFER), **ARGS) as task_id:
        calls = record_scripts(publisher_side)
        assert [task["task_id"] for task in publisher_side.poll(SID, wait=5)] == [task_id]
        assert calls == ["poll"]
        assert publisher_side.stats()["polls"] == publisher_side.gauges()["held_polls"] == 0
        # The session stays live after its poll ended, as after any poll.
        assert client_side.is_live(SID)


def test_an_outcome_posted_on_one_worker_reaches_the_client_on_another(buses):
    client_side, publisher_side = buses.make(), buses.make()
    with client_side.open_task(SID, INFER, **ARGS) as task_id:
        waiter, box = in_background(client_side.wait_result, task_id)
        [task] = publisher_side.poll(SID, wait=1)
        started = time.monotonic()
        publisher_side.complete(task["task_id"], {"status": 200, "body": {"ok": True}},
                                owner="tok")
        waiter.join(5)
        assert box["value"] == {"status": 200, "body": {"ok": True}}
        assert time.monotonic() - started < 1  # notified, not found at a deadline


def test_a_task_submitted_on_one_worker_wakes_a_poll_held_on_another(buses):
    client_side, publisher_side = buses.make(), buses.make()
    poller, box = held_poll(publisher_side)
    started = time.monotonic()
    task_id = client_side.submit(SID, dict(INFER), **ARGS)
    poller.join(5)
    assert time.monotonic() - started < 1
    assert [t["task_id"] for t in box["value"]] == [task_id]
    client_side.release(task_id)


def test_chunks_posted_on_one_worker_stream_to_the_client_on_another(buses):
    client_side, publisher_side = buses.make(), buses.make()
    with client_side.open_task(SID, STREAM, **ARGS) as task_id:
        publisher_side.poll(SID, wait=1)
        publisher_side.push_chunks(task_id, ["a", "b"], seq=0, done=False, owner="tok")
        publisher_side.push_chunks(task_id, ["a", "b", "c"], seq=0, done=False, owner="tok")
        assert client_side.next_chunks(task_id, 5, 1) == (["a", "b", "c"], False, None)
        publisher_side.push_chunks(task_id, ["[DONE]"], seq=3, done=False, owner="tok")
        assert client_side.next_chunks(task_id, 5, 1) == ([], True, None)


def test_a_client_leaving_on_one_worker_cancels_at_the_publisher_polling_another(buses):
    client_side, publisher_side = buses.make(), buses.make()
    task_id = client_side.submit(SID, dict(INFER), **ARGS)
    publisher_side.poll(SID, wait=1)
    poller, box = held_poll(publisher_side)
    client_side.release(task_id)
    poller.join(5)
    assert box["value"] == [{"kind": "cancel", "task_id": task_id}]
    with pytest.raises(Gone):
        publisher_side.complete(task_id, {"status": 200, "body": {}}, owner="tok")


def test_concurrent_wakes_on_two_workers_share_one_task(buses):
    a, b = buses.make(), buses.make()
    wake = {"kind": "wake", "llm": "m"}
    first = a.submit(SID, dict(wake), **ARGS, share_key="wake:s:m")
    second = b.submit(SID, dict(wake), **ARGS, share_key="wake:s:m")
    assert first == second
    assert len(b.poll(SID, wait=0)) == 1
    a.complete(first, {"status": 200, "body": {}}, owner="tok")
    assert a.wait_result(first) == b.wait_result(second) == {"status": 200, "body": {}}
    a.release(first)
    assert b.wait_result(second) == {"status": 200, "body": {}}  # b still holds it
    b.release(second)


def test_requests_sharing_a_finished_task_each_free_one_lease_and_all_get_the_answer(buses):
    a, b = buses.make(), buses.make()
    wake = {"kind": "wake", "llm": "m"}
    task_id = a.submit(SID, dict(wake), **ARGS, share_key="wake:s:m")
    for bus in (a, a, b):
        assert bus.submit(SID, dict(wake), **ARGS, share_key="wake:s:m") == task_id
    b.poll(SID, wait=0)
    b.complete(task_id, {"status": 200, "body": {}}, owner="tok")

    def waiting():  # the requests the task's lease hash still counts
        return a.client.hlen(f"{buses.prefix}h:{task_id}")

    for remaining in (3, 2):  # two requests on `a` get the answer and let go
        assert a.wait_result(task_id) == {"status": 200, "body": {}}
        a.release(task_id)
        wait_until(lambda: waiting() == remaining, message=f"{remaining} requests waiting")
    assert b.wait_result(task_id) == {"status": 200, "body": {}}
    b.release(task_id)
    assert a.wait_result(task_id) == {"status": 200, "body": {}}  # the last one still gets it
    a.release(task_id)
    wait_until(lambda: waiting() == 0, message="no request waiting")


def test_the_pending_limit_counts_every_worker(buses):
    a, b = buses.make(), buses.make()
    held = [a.submit(SID, dict(INFER), **{**ARGS, "limit": 3}), b.acquire_slot("m", 3)]
    held.append(b.submit(SID, dict(INFER), **{**ARGS, "limit": 3}))
    with pytest.raises(TooManyRequests):
        a.acquire_slot("m", 3)
    with pytest.raises(TooManyRequests):
        b.submit(SID, dict(INFER), **{**ARGS, "limit": 3})
    a.release(held[0])
    b.release_slot(held[1])
    b.release(held[2])


def test_a_session_polling_on_one_worker_is_live_on_every_other(buses):
    a, b = buses.make(), buses.make()
    assert not a.is_live(SID)
    poller, _ = in_background(b.poll, SID, 0.3)
    wait_until(lambda: a.is_live(SID), message="live as seen from another worker")
    poller.join()
    wait_until(lambda: not a.is_live(SID), timeout=3, message="not live once the poll ended")


def test_a_disconnect_on_one_worker_fails_requests_and_ends_polls_on_others(buses):
    a, b, c = buses.make(), buses.make(), buses.make()
    with a.open_task(SID, INFER, **ARGS) as task_id:
        b.poll(SID, wait=0)
        poller, box = held_poll(b)
        waiter, result = in_background(a.wait_result, task_id)
        assert c.drop_session(SID, "publisher disconnected") == 1
        poller.join(5)
        waiter.join(5)
        assert box["value"] == []
        assert isinstance(result["error"], Unavailable)
        assert "publisher disconnected" in result["error"].message
    assert not b.is_live(SID)


# -- workers that die -----------------------------------------------------------

def test_a_dead_workers_tasks_end_for_the_publisher_and_its_slots_are_freed(buses):
    doomed = buses.make(worker_ttl=0.5)
    survivor = buses.make()
    picked = doomed.submit(SID, dict(STREAM), **{**ARGS, "limit": 3})
    queued = doomed.submit(SID, dict(INFER), **{**ARGS, "limit": 3})
    doomed.acquire_slot("m", 3)
    assert [t["task_id"] for t in survivor.poll(SID, wait=0)][:1] == [picked]
    survivor.push_chunks(picked, ["a"], seq=0, done=False, owner="tok")
    doomed.close()  # the worker holding the clients dies: nothing is released

    def dead():
        try:
            survivor.push_chunks(picked, ["b"], seq=1, done=False, owner="tok")
        except Gone:
            return True
        return False
    wait_until(dead, timeout=5, message="the publisher's next post is a 410")
    assert survivor.poll(SID, wait=0) == [{"kind": "cancel", "task_id": picked}]
    # Its slots and its waiting requests no longer count against the limit.
    held = [survivor.acquire_slot("m", 3) for _ in range(3)]
    for slot in held:
        survivor.release_slot(slot)
    with pytest.raises(Gone):
        survivor.task_info(queued, owner="tok")


def test_a_poll_never_hands_out_a_task_whose_client_worker_died(buses):
    doomed, survivor = buses.make(worker_ttl=0.5), buses.make()
    task_id = doomed.submit(SID, dict(INFER), **ARGS)
    doomed.close()
    wait_until(lambda: _worker_dead(buses, doomed), timeout=5, message="the worker's lease lapsed")
    assert survivor.poll(SID, wait=0) == []
    with pytest.raises(Gone):
        survivor.complete(task_id, {"status": 200, "body": {}}, owner="tok")


def test_a_shared_wake_outlives_one_of_its_workers(buses):
    doomed, survivor = buses.make(worker_ttl=0.5), buses.make()
    wake = {"kind": "wake", "llm": "m"}
    task_id = doomed.submit(SID, dict(wake), **ARGS, share_key="wake:s:m")
    assert survivor.submit(SID, dict(wake), **ARGS, share_key="wake:s:m") == task_id
    survivor.poll(SID, wait=0)
    doomed.close()
    wait_until(lambda: _worker_dead(buses, doomed), timeout=5, message="the worker's lease lapsed")
    survivor.complete(task_id, {"status": 200, "body": {}}, owner="tok")
    assert survivor.wait_result(task_id) == {"status": 200, "body": {}}
    survivor.release(task_id)


def _worker_dead(buses, bus) -> bool:
    import redis

    client = redis.Redis.from_url(stack.REDIS_URL, decode_responses=True)
    try:
        score = client.zscore(buses.prefix + "workers", bus.worker_id)
    finally:
        client.close()
    return score is None or score < time.time()


# -- wall-clock deadlines ---------------------------------------------------------

class Clock:
    def __init__(self, offset=0.0):
        self.offset = offset

    def __call__(self):
        return time.time() + self.offset


def test_a_deadline_set_by_one_worker_is_enforced_by_another(buses):
    now, later = Clock(), Clock(offset=31.0)
    client_side, publisher_side = buses.make(clock=now), buses.make(clock=later)
    with client_side.open_task(SID, INFER, **{**ARGS, "pickup_timeout": 30.0}) as task_id:
        assert publisher_side.poll(SID, wait=0) == []  # 31 s later: past its pickup deadline
        with pytest.raises(GatewayTimeout) as err:
            client_side.wait_result(task_id)
        assert err.value.code == "pickup_timeout"


# -- Redis going away and coming back -----------------------------------------------

@pytest.fixture
def proxy():
    target = urlsplit(stack.REDIS_URL)
    proxy = TcpProxy(target.hostname, target.port or 6379).start()
    yield proxy
    proxy.stop()


def proxied_url(proxy) -> str:
    target = urlsplit(stack.REDIS_URL)
    return target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


def test_redis_unreachable_is_a_quick_bus_unavailable_and_releases_never_raise(buses, proxy):
    bus = buses.make(url=proxied_url(proxy))
    task_id = bus.submit(SID, dict(INFER), **ARGS)
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(Unavailable) as err:
        bus.submit(SID, dict(INFER), **ARGS)
    assert err.value.code == "bus_unavailable"
    assert err.value.headers == {"Retry-After": "1"}
    with pytest.raises(Unavailable):
        bus.ping()
    bus.release(task_id)  # retried once Redis is back
    assert time.monotonic() - started < 5
    proxy.restore()
    other = buses.make()
    wait_until(lambda: _cancelled(other, task_id), timeout=10,
               message="the release went through once Redis was back")
    other.release_slot(other.acquire_slot("m", 1))  # and its lease no longer counts


def _cancelled(bus, task_id) -> bool:
    try:
        bus.task_info(task_id)
    except Gone:
        return True
    return False


def test_the_bus_recovers_by_itself_when_redis_comes_back(buses, proxy):
    bus = buses.make(url=proxied_url(proxy))
    other = buses.make()
    bus.ping()
    proxy.cut()
    with pytest.raises(Unavailable):
        bus.is_live(SID)
    proxy.restore()
    wait_until(lambda: _answers(bus), timeout=10, message="the bus answers again")
    # Its listener has resubscribed: a held poll is woken by a task from elsewhere.
    poller, box = held_poll(bus)
    wait_until(lambda: _listening(bus), timeout=10, message="the listener is back")
    started = time.monotonic()
    task_id = other.submit(SID, dict(INFER), **ARGS)
    poller.join(6)
    assert [t["task_id"] for t in box["value"]] == [task_id]
    assert time.monotonic() - started < 2
    other.release(task_id)


def test_a_listener_that_hears_nothing_reconnects_and_wakes_its_waiters(buses, proxy):
    bus = buses.make(url=proxied_url(proxy), silence_timeout=1.0, socket_timeout=1.0)
    other = buses.make()

    def publisher():  # polls again after a failed poll, as publishers do
        while True:
            try:
                if tasks := bus.poll(SID, wait=20):
                    return tasks
            except Unavailable:
                pass

    poller, box = in_background(publisher)
    wait_until(lambda: bus.is_live(SID) and _listening(bus), message="polling and subscribed")
    proxy.blackhole()  # its connections go quiet for good, without closing
    task_id = other.submit(SID, dict(INFER), **ARGS)  # so its notification is lost
    started = time.monotonic()
    poller.join(20)
    assert [t["task_id"] for t in box["value"]] == [task_id]
    assert time.monotonic() - started < 8  # not the poll's 20 s: the listener came back
    other.release(task_id)


def _answers(bus) -> bool:
    try:
        bus.ping()
        return True
    except Unavailable:
        return False


def _listening(bus) -> bool:
    import redis

    client = redis.Redis.from_url(stack.REDIS_URL, decode_responses=True)
    try:
        channel = f"{bus.prefix}w:{bus.worker_id}"
        return client.pubsub_numsub(channel)[0][1] > 0
    finally:
        client.close()


def test_every_key_has_a_ttl_while_tasks_are_in_flight(buses):
    a, b = buses.make(), buses.make()
    ids = [a.submit(SID, dict(STREAM), **ARGS) for _ in range(3)]
    wake = a.submit(SID, {"kind": "wake", "llm": "m"}, **ARGS, share_key="wake:s:m")
    slot = b.acquire_slot("m", 10)
    b.poll(SID, wait=0)
    b.push_chunks(ids[0], ["a"], seq=0, done=False, owner="tok")
    a.release(ids[1])
    keys = buses.keys()
    assert keys and all(ttl > 0 for ttl in keys.values()), keys
    for task_id in (ids[0], ids[2], wake):
        a.release(task_id)
    b.release_slot(slot)


# -- public LLMs' rows version (services/routes.py) -------------------------------

def test_the_routes_version_moves_for_every_worker(buses):
    first, second = buses.make(), buses.make()
    seen = first.routes_version()
    assert second.routes_version() == seen
    second.routes_changed()
    assert first.routes_version() != seen
    with pytest.raises(RoutesChanged):
        first.acquire_slot("m", 10, routes_version=seen)


def test_a_routes_version_whose_key_is_gone_starts_again_past_every_old_one(buses):
    bus = buses.make()
    for _ in range(3):
        bus.routes_changed()
    old = bus.routes_version()
    redis.Redis.from_url(stack.REDIS_URL).delete(buses.prefix + "routes")  # a Redis restarted empty
    assert bus.routes_version() == "v"
    with pytest.raises(RoutesChanged):
        bus.acquire_slot("m", 10, routes_version=old)
    bus.routes_changed()
    assert int(bus.routes_version()[1:]) > int(old[1:])


def test_a_routes_change_redis_cannot_hear_raises_or_is_made_once_it_can(buses, proxy):
    bus, other = buses.make(url=proxied_url(proxy)), buses.make()
    seen = other.routes_version()
    bus.ping()
    proxy.cut()
    with pytest.raises(Unavailable):
        bus.routes_changed()
    bus.routes_changed(later_if_unreachable=True)   # never raises
    assert other.routes_version() == seen
    proxy.restore()
    wait_until(lambda: other.routes_version() != seen, timeout=15,
               message="the change was made once Redis was back")
