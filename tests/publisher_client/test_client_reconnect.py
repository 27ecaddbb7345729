"""Backoff with jitter, and the poll loop's reactions: re-register when the
server forgets the session, back off while it is unreachable."""
import json
import threading

import pytest
import requests
import responses

from publisher_client import Publisher
from publisher_client.backoff import Backoff
from publisher_client.errors import ServerError
from tests.publisher_client.helpers import API, calls_to, register_reply, sent_json, wait_for


SESSION_GONE = {"error": {"message": "Session 'sess-1' not found; register again",
                         "type": "not_found_error", "code": "session_not_found"}}


class RecordedSleep:
    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)


def test_backoff_doubles_up_to_the_cap():
    backoff = Backoff(base=0.5, cap=4.0, random=lambda: 1.0)

    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_jitter_draws_from_the_upper_half():
    low = Backoff(base=1.0, cap=60.0, random=lambda: 0.0)
    high = Backoff(base=1.0, cap=60.0, random=lambda: 0.999)

    assert [low.next_delay() for _ in range(3)] == [0.5, 1.0, 2.0]
    assert [round(high.next_delay(), 3) for _ in range(3)] == [1.0, 1.999, 3.998]


def test_backoff_resets_after_a_success():
    sleep = RecordedSleep()
    backoff = Backoff(base=1.0, cap=60.0, sleep=sleep, random=lambda: 1.0)
    backoff.wait()
    backoff.wait()

    backoff.reset()
    backoff.wait()

    assert sleep.delays == [1.0, 2.0, 1.0]
    assert backoff.failing


def test_backoff_survives_a_very_long_outage():
    backoff = Backoff(base=0.5, cap=30.0, random=lambda: 1.0)
    backoff.attempt = 5000

    assert backoff.next_delay() == 30.0


def stop_after_polls(publisher, replies):
    """A poll callback answering `replies` in turn ((status, body) or an
    exception), then stopping the publisher."""
    replies = list(replies)

    def poll(request):
        if not replies:
            publisher.stop()
            return 200, {}, json.dumps({"tasks": []})
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        status, body = reply
        return status, {}, body if isinstance(body, str) else json.dumps(body)
    return poll


def test_poll_404_registers_again_with_the_same_session_id(make_config, mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    publisher = Publisher(make_config(heartbeat_seconds=60),
                          backoff=Backoff(sleep=RecordedSleep()))
    gone = SESSION_GONE
    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks",
                        callback=stop_after_polls(publisher, [(404, gone)]))
    mocked.delete(f"{API}/publishers/sess-1", status=204)

    publisher.run()

    registers = calls_to(mocked, "POST", "/publishers/register")
    assert [sent_json(c)["session_id"] for c in registers] == [None, "sess-1"]
    assert len(calls_to(mocked, "GET", "/tasks")) == 2


def test_heartbeat_404_registers_again(make_config, mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    mocked.post(f"{API}/publishers/sess-1/heartbeat", status=404, json=SESSION_GONE)
    publisher = Publisher(make_config(), backoff=Backoff(sleep=RecordedSleep()))
    publisher.register()

    publisher.heartbeat()

    assert [sent_json(c)["session_id"]
            for c in calls_to(mocked, "POST", "/publishers/register")] == [None, "sess-1"]


def test_a_poll_404_that_is_not_session_not_found_is_retried_not_registered_again(
        make_config, mocked):
    """A proxy's HTML 404 says nothing about our session."""
    sleep = RecordedSleep()
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    publisher = Publisher(make_config(heartbeat_seconds=60), backoff=Backoff(sleep=sleep))
    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks",
                        callback=stop_after_polls(publisher, [(404, "<html>Not Found</html>")]))
    mocked.delete(f"{API}/publishers/sess-1", status=204)

    publisher.run()

    assert len(calls_to(mocked, "POST", "/publishers/register")) == 1
    assert len(sleep.delays) == 1


def test_a_heartbeat_404_that_is_not_session_not_found_does_not_register_again(make_config,
                                                                               mocked):
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    mocked.post(f"{API}/publishers/sess-1/heartbeat", status=404, body="<html>Not Found</html>")
    publisher = Publisher(make_config())
    publisher.register()

    publisher.heartbeat()

    assert len(calls_to(mocked, "POST", "/publishers/register")) == 1


def test_a_session_forgotten_again_right_after_registering_backs_off(make_config, mocked):
    sleep = RecordedSleep()
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    publisher = Publisher(make_config(heartbeat_seconds=60), backoff=Backoff(sleep=sleep))
    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks",
                        callback=stop_after_polls(publisher, [(404, SESSION_GONE)] * 3))
    mocked.delete(f"{API}/publishers/sess-1", status=204)

    publisher.run()

    assert len(calls_to(mocked, "POST", "/publishers/register")) == 4
    assert len(sleep.delays) == 3
    for attempt, delay in enumerate(sleep.delays):   # 1 s, 2 s, 4 s, each with jitter
        assert 2 ** attempt / 2 <= delay <= 2 ** attempt


def test_unreachable_server_is_retried_with_growing_delays_then_reconnects(
        make_config, mocked, caplog):
    caplog.set_level("INFO", logger="publisher_client")
    sleep = RecordedSleep()
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    publisher = Publisher(make_config(heartbeat_seconds=60),
                          backoff=Backoff(base=1.0, sleep=sleep, random=lambda: 1.0))
    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks",
                        callback=stop_after_polls(publisher, [
                            requests.ConnectionError("refused"), (502, {}), (503, {}),
                            (200, {"tasks": []}), requests.ConnectionError("refused")]))
    mocked.delete(f"{API}/publishers/sess-1", status=204)

    publisher.run()

    assert sleep.delays == [1.0, 2.0, 4.0, 1.0]   # reset by the successful poll
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot reach server" in m and "retrying in 1.00 s" in m for m in messages)
    assert "reconnected to server" in messages


def test_unreachable_server_at_start_is_retried_until_register_succeeds(make_config, mocked):
    sleep = RecordedSleep()
    mocked.post(f"{API}/publishers/register", body=requests.ConnectionError("refused"))
    mocked.post(f"{API}/publishers/register", status=503)
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    publisher = Publisher(make_config(), backoff=Backoff(base=1.0, sleep=sleep,
                                                         random=lambda: 0.0))

    assert publisher.connect() is True

    assert publisher.session_id == "sess-1"
    assert sleep.delays == [0.5, 1.0]


def test_a_refused_token_ends_run_with_an_error(make_config, mocked):
    mocked.post(f"{API}/publishers/register", status=401,
                json={"error": {"message": "unknown token"}})

    with pytest.raises(ServerError, match="401 unknown token"):
        Publisher(make_config()).run()


def test_a_proxy_page_instead_of_json_is_retried_not_a_crash(make_config, mocked):
    sleep = RecordedSleep()
    mocked.post(f"{API}/publishers/register", json=register_reply("sess-1"), status=201)
    publisher = Publisher(make_config(heartbeat_seconds=60), backoff=Backoff(sleep=sleep))
    mocked.add_callback(responses.GET, f"{API}/publishers/sess-1/tasks",
                        callback=stop_after_polls(publisher, [(200, "<html>Log in</html>")]))
    mocked.delete(f"{API}/publishers/sess-1", status=204)

    publisher.run()

    assert len(sleep.delays) == 1


def test_the_heartbeat_thread_survives_an_unexpected_error(make_config, caplog):
    publisher = Publisher(make_config(heartbeat_seconds=0.05))
    publisher.session_id = "sess-1"
    beats = []

    def heartbeat(session_id):
        beats.append(session_id)
        if len(beats) == 1:
            raise RuntimeError("surprise")
    publisher.api.heartbeat = heartbeat
    thread = threading.Thread(target=publisher._heartbeat_loop, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(beats) >= 3, what="heartbeats after the error")
        assert thread.is_alive()
        assert "heartbeat failed" in caplog.text and "surprise" in caplog.text
    finally:
        publisher.stop()
        thread.join(5)
