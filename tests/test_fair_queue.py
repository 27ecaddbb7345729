"""The fair queue and declared capacity, on both buses (the Redis half of `make
test` runs them on Redis too): who is served next, what is never exceeded,
what a wait costs and what leaving gives back. Time is an injected clock where
the test is about time."""
import threading
import time

import pytest

from services.bus.base import Member
from services.errors import TooManyRequests, Unavailable
from tests.support import stack
from tests.support.buses import Buses
from tests.support.waiting import wait_until

LIMITS = {"limit": 100, "per_token": 32, "timeout": 60.0}


class Clock:
    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.time() + self.offset

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture(params=["memory", "redis"] if stack.BUS == "redis" else ["memory"])
def buses(request):
    buses = Buses(request.param, session_liveness=5.0)
    yield buses
    assert not buses.close(), "Redis keys without a TTL"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def bus(buses, clock):
    bus = buses.make(clock=clock)
    yield bus
    stats = bus.stats()
    assert (stats["places"], stats["in_use"], stats["pending"]) == (0, 0, 0), stats


def enter(bus, token, members, queue="q", **limits):
    return bus.enter_queue(queue, token, members, **{**LIMITS, **limits})


def granted(bus, place):
    return bus.wait_turn(place, 0)


ONE = [Member("box", capacity=1)]


def test_a_free_member_is_granted_at_once_and_a_full_one_makes_the_next_wait(bus):
    first = enter(bus, "a", ONE)
    assert first.member == "box"
    second = enter(bus, "a", ONE)
    assert (second.member, second.position) == (None, 1)
    assert not granted(bus, second)
    bus.leave_queue(first)
    assert granted(bus, second) and second.member == "box"
    bus.leave_queue(second)


def test_a_light_token_is_served_before_a_heavy_ones_queue(bus):
    running = enter(bus, "heavy", ONE)
    heavy = [enter(bus, "heavy", ONE) for _ in range(4)]
    light = enter(bus, "light", ONE)
    assert light.position == 1  # next, not fifth
    order = []
    place = running
    for _ in range(5):
        bus.leave_queue(place)
        place = next_granted(bus, [*heavy, light], order)
        order.append(place)
    bus.leave_queue(place)
    assert [p.token if p is light else heavy.index(p) for p in order] == ["light", 0, 1, 2, 3]


def next_granted(bus, places, served):
    """The one place of `places` granted since (each leave grants at most one)."""
    [place] = [p for p in places if p not in served and granted(bus, p)]
    return place


def test_tokens_take_turns_and_each_is_served_in_arrival_order(bus):
    first = enter(bus, "a", ONE)
    queued = [enter(bus, token, ONE) for token in ("a", "a", "b", "b", "c")]
    served = []
    place = first
    for _ in queued:
        bus.leave_queue(place)
        place = next_granted(bus, queued, served)
        served.append(place)
    bus.leave_queue(place)
    assert [(p.token, queued.index(p)) for p in served] == [
        ("b", 2), ("c", 4), ("a", 0), ("b", 3), ("a", 1)]


def test_the_member_with_the_most_free_capacity_is_chosen_in_proportion(bus):
    members = [Member("big", capacity=4), Member("small", capacity=1), Member("uncapped")]
    places = [enter(bus, "t", members) for _ in range(6)]
    chosen = [p.member for p in places]
    # One each first (all idle), then by load: used / capacity, an uncapped member
    # weighed as 4, ties in turn; "small" is full after one.
    assert sorted(chosen[:3]) == ["big", "small", "uncapped"]
    assert {m: chosen.count(m) for m in ("big", "small", "uncapped")} == {
        "big": 3, "small": 1, "uncapped": 2}
    for place in places:
        bus.leave_queue(place)


def test_nothing_exceeds_a_declared_capacity(bus):
    members = [Member("a", capacity=2), Member("b", capacity=3)]
    places = [enter(bus, f"t{n % 3}", members) for n in range(9)]
    running = [p for p in places if p.member]
    assert {m: [p.member for p in running].count(m) for m in "ab"} == {"a": 2, "b": 3}
    assert all(not granted(bus, p) for p in places if not p.member)
    for place in places:
        bus.leave_queue(place)


def test_a_member_whose_session_is_not_live_gets_nothing(bus):
    bus.touch("live-session")
    members = [Member("dead", capacity=4, session_id="gone-session"),
               Member("alive", capacity=4, session_id="live-session")]
    places = [enter(bus, "t", members) for _ in range(3)]
    assert [p.member for p in places] == ["alive"] * 3
    for place in places:
        bus.leave_queue(place)


def test_the_limits_are_429s(bus):
    held = [enter(bus, "t", ONE, limit=3, per_token=1) for _ in range(2)]  # one runs, one waits
    with pytest.raises(TooManyRequests) as err:
        enter(bus, "t", ONE, limit=3, per_token=1)
    assert err.value.code == "too_many_queued"
    held.append(enter(bus, "u", ONE, limit=3, per_token=1))
    with pytest.raises(TooManyRequests) as err:
        enter(bus, "v", ONE, limit=3, per_token=1)
    assert err.value.code == "too_many_pending"
    assert err.value.headers == {"Retry-After": "1"}
    for place in held:
        bus.leave_queue(place)


def test_a_request_that_waited_the_queue_timeout_is_503(bus, clock):
    running = enter(bus, "a", ONE, timeout=60)
    waiting = enter(bus, "b", ONE, timeout=60)
    clock.advance(61)
    with pytest.raises(Unavailable) as err:
        bus.wait_turn(waiting, 0)
    assert err.value.code == "queue_timeout"
    assert err.value.headers == {"Retry-After": "1"}
    bus.leave_queue(waiting)
    bus.leave_queue(running)
    assert enter_and_leave(bus)


def enter_and_leave(bus) -> bool:
    place = enter(bus, "x", ONE)
    try:
        return place.member == "box"
    finally:
        bus.leave_queue(place)


def test_a_request_that_leaves_gives_up_its_place(bus):
    running = enter(bus, "a", ONE)
    leaving = enter(bus, "b", ONE)
    staying = enter(bus, "c", ONE)
    assert staying.position == 2
    bus.leave_queue(leaving)
    assert not granted(bus, staying)
    assert staying.position == 1
    bus.leave_queue(running)
    assert granted(bus, staying)
    bus.leave_queue(staying)


def test_a_waiter_is_woken_as_soon_as_a_turn_is_granted(bus):
    running = enter(bus, "a", ONE)
    waiting = enter(bus, "b", ONE)
    box = {}
    waiter = threading.Thread(target=lambda: box.setdefault("turn", bus.wait_turn(waiting, 5)))
    waiter.start()
    started = time.monotonic()
    bus.leave_queue(running)
    waiter.join(5)
    assert box["turn"] is True and time.monotonic() - started < 1
    bus.leave_queue(waiting)


def test_a_member_shared_by_two_queues_serves_both(bus):
    shared = Member("box", capacity=1)
    own = enter(bus, "a", [shared], queue="box")
    pooled = enter(bus, "b", [shared], queue="pool:m")
    assert own.member == "box" and pooled.member is None
    bus.leave_queue(own)
    assert granted(bus, pooled)
    bus.leave_queue(pooled)


@pytest.fixture
def redis_buses():
    buses = Buses("redis", session_liveness=5.0)
    yield buses
    assert not buses.close(), "Redis keys without a TTL"


@stack.only_on(bus="redis")
def test_a_turn_freed_on_one_worker_is_granted_to_a_request_on_another(redis_buses):
    a, b = redis_buses.make(), redis_buses.make()
    running = enter(a, "x", ONE)
    waiting = enter(b, "y", ONE)
    box = {}
    waiter = threading.Thread(target=lambda: box.setdefault("turn", b.wait_turn(waiting, 5)))
    waiter.start()
    a.leave_queue(running)
    waiter.join(5)
    assert box["turn"] is True
    b.leave_queue(waiting)


@stack.only_on(bus="redis")
def test_a_dead_workers_turns_are_freed(redis_buses):
    doomed, survivor = redis_buses.make(worker_ttl=0.5), redis_buses.make()
    enter(doomed, "x", ONE)
    waiting = enter(survivor, "y", ONE)
    doomed.close()  # killed: never leaves its place
    wait_until(lambda: survivor.wait_turn(waiting, 0.2), timeout=5,
               message="the dead worker's turn lapsed and went to the next")
    survivor.leave_queue(waiting)
