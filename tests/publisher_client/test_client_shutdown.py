"""Shutting down: no heartbeat or register lands after the session's DELETE,
and a second signal does not cut the DELETE short."""
import json
import signal
import threading

import responses

from publisher_client import Publisher
from publisher_client.backoff import Backoff
from tests.publisher_client.helpers import (API, FakeSwitchboard, PublisherProcess,
                                            register_reply)


def test_heartbeat_does_nothing_once_stopping(make_config, mocked):
    publisher = Publisher(make_config())
    publisher.session_id = "sess-1"
    publisher.stopping.set()

    publisher.heartbeat()

    assert not mocked.calls


def slow_callback(events, name, status, body, release):
    """A responses callback that waits for `release`, then notes `name` in `events`."""
    started = threading.Event()

    def callback(request):
        started.set()
        release.wait(5)
        events.append(name)
        return status, {}, json.dumps(body)
    return callback, started


def note_delete(events):
    def callback(request):
        events.append("DELETE")
        return 204, {}, ""
    return callback


def test_shutdown_waits_for_a_heartbeat_in_flight_before_the_delete(make_config, mocked):
    events, release = [], threading.Event()
    heartbeat, in_flight = slow_callback(events, "heartbeat", 200, {"ok": True}, release)
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    mocked.add_callback(responses.POST, f"{API}/publishers/sess-1/heartbeat", callback=heartbeat)
    mocked.add_callback(responses.DELETE, f"{API}/publishers/sess-1",
                        callback=note_delete(events))
    publisher = Publisher(make_config())
    publisher.register()
    beat = threading.Thread(target=publisher.heartbeat)
    beat.start()
    assert in_flight.wait(5)

    threading.Timer(0.3, release.set).start()
    publisher.shutdown()

    beat.join(5)
    assert events == ["heartbeat", "DELETE"]


def test_shutdown_waits_for_a_register_in_flight_before_the_delete(make_config, mocked):
    events, release = [], threading.Event()
    register, in_flight = slow_callback(events, "register", 201, register_reply(), release)
    mocked.post(f"{API}/publishers/register", json=register_reply(), status=201)
    mocked.add_callback(responses.POST, f"{API}/publishers/register", callback=register)
    mocked.add_callback(responses.DELETE, f"{API}/publishers/sess-1",
                        callback=note_delete(events))
    publisher = Publisher(make_config(), backoff=Backoff(sleep=lambda seconds: None))
    publisher.register()
    again = threading.Thread(target=publisher._register_again, args=(publisher.generation,))
    again.start()
    assert in_flight.wait(5)

    threading.Timer(0.3, release.set).start()
    publisher.shutdown()

    again.join(5)
    assert events == ["register", "DELETE"]


def test_a_second_signal_does_not_cut_the_delete_short(tmp_path):
    server = FakeSwitchboard(delete_seconds=1.0)
    publisher = PublisherProcess(server, tmp_path, [{"name": "echo", "type": "echo"}],
                                 poll_wait_seconds=0.2)
    try:
        publisher.start()

        publisher.process.send_signal(signal.SIGINT)
        assert server.delete_started.wait(10), publisher.log_text()
        publisher.process.send_signal(signal.SIGTERM)

        assert publisher.process.wait(15) == 0
        assert "disconnected session sess-1" in publisher.log_text()
    finally:
        publisher.stop()
        server.stop()
