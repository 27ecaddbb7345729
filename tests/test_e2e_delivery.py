"""Delivery under faults, end to end: the real gunicorn + gevent server (two
workers in the Redis half), the real `publisher_client` (a process, or in this
process for the many-publishers test), loopback only, every wait bounded.

- a poll's answer cut on its way to the publisher: the task is delivered again;
- a publisher killed mid-task and mid-stream: its clients hear within
  PUBLISHER_LOST_TIMEOUT, not INFER_TIMEOUT;
- the server restarted under 20 polling publishers: they all come back, not in
  lockstep;
- a proxy that cuts every long-poll: the publisher adapts, nothing is lost;
- a client that reads a long stream slowly: the publisher is held back, the
  server's memory stays bounded;
- clients that leave while queued and while streaming.
"""
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.held_polls import rss_mb
from bench.server import child_pids
from publisher_client.config import parse_config
from publisher_client.publisher import Publisher
from tests.publisher_client.helpers import LateHeadersBackend, PublisherProcess, SlowStreamBackend
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until

SETTINGS = {"SWITCHBOARD_TASK_ACK_TIMEOUT": "1", "SWITCHBOARD_PUBLISHER_LOST_TIMEOUT": "3",
            "SWITCHBOARD_TASK_PICKUP_TIMEOUT": "20", "SWITCHBOARD_STREAM_KEEPALIVE": "1",
            "SWITCHBOARD_POLL_WAIT_MAX": "4", "SWITCHBOARD_MAX_BUFFERED_CHUNKS": "200",
            # One request at a time per LLM: a lease left behind shows as a 429.
            "SWITCHBOARD_MAX_PENDING_PER_LLM": "1"}
ECHO = {"name": "echo-box", "type": "echo"}


def infer(server, name, content="hi", stream=False, **kwargs):
    return requests.post(f"{server.url}/api/v1/llms/{name}/infer",
                         headers=server.headers("client"), stream=stream,
                         timeout=kwargs.pop("timeout", (5, 60)),
                         json={"stream": stream, "messages": [{"role": "user", "content": content}]},
                         **kwargs)


def data_events(response) -> list[str]:
    return [line[6:] for line in response.iter_lines(decode_unicode=True)
            if line.startswith("data: ")]


@pytest.fixture
def server(live_server_factory):
    return live_server_factory(SETTINGS)


@pytest.fixture
def proxy(server):
    proxy = TcpProxy("127.0.0.1", server.port).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def publisher_process(server, tmp_path):
    started = []

    def start(llms, via=None, **settings):
        target = server if via is None else _Via(server, via)
        process = PublisherProcess(target, tmp_path, llms, name=f"pub{len(started)}",
                                   heartbeat_seconds=1, poll_wait_seconds=4, **settings)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


class _Via:
    """A server as seen through a proxy (the publisher's side)."""

    def __init__(self, server, proxy):
        self.url, self.tokens = proxy.url, server.tokens


# -- a poll's answer lost on the way ---------------------------------------------

def test_a_task_whose_poll_answer_was_cut_is_delivered_again(server, proxy, publisher_process):
    publisher = publisher_process([ECHO], via=proxy)
    proxy.cut_responses(lambda data: b'"kind":"infer"' in data, count=1)
    started = time.monotonic()
    response = infer(server, "echo-box", "lost once")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "lost once"
    assert proxy.cuts == 1
    assert time.monotonic() - started < 10  # the ack timeout (1 s) and a re-poll, not 600 s
    publisher.wait_for_log("done in")
    assert publisher.log_text().count(" done in ") == 1  # run once, answered once


# -- a publisher killed ------------------------------------------------------------

def test_a_publisher_killed_mid_task_fails_its_client_within_the_lost_timeout(
        server, publisher_process):
    backend = LateHeadersBackend(delay=60)
    try:
        publisher = publisher_process([{"name": "stuck", "type": "openai", "url": backend.url,
                                        "model": "m"}])
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(infer, server, "stuck")
            assert backend.received.wait(10)
            publisher.kill()
            killed = time.monotonic()
            response = pending.result(30)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "publisher_lost"
        assert time.monotonic() - killed < 3 + 5  # PUBLISHER_LOST_TIMEOUT and a few seconds
    finally:
        backend.stop()


def test_a_publisher_killed_mid_stream_ends_the_stream_with_an_error_event(
        server, publisher_process):
    backend = SlowStreamBackend(chunks=2000, interval=0.02)
    try:
        publisher = publisher_process([{"name": "streamer", "type": "openai",
                                        "url": backend.url, "model": "m"}])
        response = infer(server, "streamer", stream=True)
        lines = response.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line.startswith("data: "))
        assert "w0" in first
        publisher.kill()
        killed = time.monotonic()
        rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-1])["error"]["code"] == "publisher_lost"
        assert "[DONE]" not in rest
        assert time.monotonic() - killed < 3 + 5
    finally:
        backend.stop()


# -- the server restarted under many publishers -------------------------------------

RETRY_IN = re.compile(r"cannot reach server .*; retrying in ([0-9.]+) s")


def test_twenty_publishers_come_back_after_a_server_restart_not_in_lockstep(server, tmp_path,
                                                                           caplog):
    caplog.set_level(logging.INFO, logger="publisher_client.publisher")
    publishers, threads = [], []
    for n in range(20):
        config = parse_config({
            "server": server.url, "token": server.tokens["publisher"], "poll_wait_seconds": 4,
            "heartbeat_seconds": 5, "session_file": str(tmp_path / f"s{n}" / "session.json"),
            "llms": [{"name": f"herd-{n}", "type": "echo"}]}, environ={})
        publisher = Publisher(config)
        publishers.append(publisher)
        threads.append(threading.Thread(target=publisher.run, daemon=True))
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: all(p.registered for p in publishers), timeout=30,
                   message="all registered")
        server.restart()
        back = time.monotonic()
        wait_until(lambda: all(infer(server, f"herd-{n}", timeout=(2, 10)).status_code == 200
                               for n in range(20)), timeout=60, interval=0.5,
                   message="every publisher serves again")
        assert time.monotonic() - back < 60
        reconnects = [r.created for r in caplog.records if "reconnected" in r.getMessage()]
        assert len(reconnects) >= 20
        # Jittered retries, not one herd in lockstep: the moments the publishers
        # planned to try again are spread. (When they succeed is the server's
        # doing: a restarting server may answer a backlog of them at once.)
        retries = sorted(r.created + float(RETRY_IN.search(r.getMessage()).group(1))
                         for r in caplog.records if RETRY_IN.search(r.getMessage()))
        assert len(retries) >= 20
        assert retries[19] - retries[0] > 0.1
    finally:
        for publisher in publishers:
            publisher.stop()
        for thread in threads:
            thread.join(15)


# -- a proxy that cuts every long-poll ----------------------------------------------

def test_a_proxy_cutting_every_long_poll_loses_no_task(server, proxy, publisher_process):
    proxy.cut_waits_after(2.5)  # below the 4 s poll wait, as nginx at 20 s below 25 s would
    publisher = publisher_process([ECHO], via=proxy)
    publisher.wait_for_log("a poll was cut", timeout=15)
    answers = []
    for n in range(8):
        response = infer(server, "echo-box", f"question {n}")
        answers.append((response.status_code, response.json()["choices"][0]["message"]
                        ["content"] if response.status_code == 200 else response.text))
        time.sleep(0.3)  # spread over several poll lifetimes
    assert answers == [(200, f"question {n}") for n in range(8)]
    assert "cannot reach server" not in publisher.log_text()


# -- a slow reader --------------------------------------------------------------------

def test_a_slow_reader_holds_the_publisher_back_and_server_memory_stays_bounded(
        server, publisher_process):
    # 20,000 chunks of 1 KB; the server buffers at most 200 of them per stream.
    backend = SlowStreamBackend(chunks=20_000, interval=0, padding=1000)
    try:
        publisher = publisher_process([{"name": "firehose", "type": "openai",
                                        "url": backend.url, "model": "m"}])
        workers = child_pids(server.process.pid)
        before = sum(rss_mb(pid) for pid in workers)
        response = infer(server, "firehose", stream=True, timeout=(5, 120))
        received, peak = 0, before
        for data in response.iter_lines(chunk_size=16384):
            if data.startswith(b"data: {"):
                received += 1
                if received % 1000 == 0:
                    peak = max(peak, sum(rss_mb(pid) for pid in workers))
                    time.sleep(0.5)  # a slow reader, 2 MB/s: slower than the kernel's buffers absorb
        assert received == 20_000  # every chunk, in order, in the end
        assert "429" in publisher.log_text()  # the publisher was held back
        assert peak - before < 12  # MB, for a 20 MB stream: the server did not buffer it
    finally:
        backend.stop()


# -- clients that leave ----------------------------------------------------------------

def test_a_client_leaving_while_queued_takes_its_task_with_it(server):
    from tests.support.protocol_publisher import ProtocolPublisher

    publisher = ProtocolPublisher(server, [{"name": "queue-only", "model": "m"}])
    publisher.register()  # registered, but it does not poll yet
    with pytest.raises(requests.Timeout):
        infer(server, "queue-only", timeout=(5, 0.5))
    # Within the 2 s client check the task is gone, and its place too (the limit is 1).
    wait_until(lambda: publisher.poll(wait=0) == [] and _admitted(server, publisher),
               timeout=10, message="the queued task and its place are gone")


def _admitted(server, publisher) -> bool:
    """A new request on the LLM is admitted (not 429) and answered."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(infer, server, "queue-only")
        tasks = []
        deadline = time.monotonic() + 5
        while not tasks and not pending.done() and time.monotonic() < deadline:
            tasks = [t for t in publisher.poll(wait=0.5) if t["kind"] == "infer"]
        for task in tasks:
            publisher.result(task["task_id"], status=200, body={"ok": True})
        return pending.result(10).status_code == 200


def test_a_client_leaving_mid_stream_stops_the_backend_and_frees_its_place(
        server, publisher_process):
    backend = SlowStreamBackend(chunks=2000, interval=0.02)
    try:
        publisher = publisher_process([{"name": "walker", "type": "openai", "url": backend.url,
                                        "model": "m"}])
        response = infer(server, "walker", stream=True)
        next(line for line in response.iter_lines() if line.startswith(b"data: "))
        response.close()
        assert backend.disconnected.wait(15)
        publisher.wait_for_log("the client went away")
        assert backend.chunks_sent < 2000
        # Its place is free again (the limit is 1): the next stream runs.
        again = infer(server, "walker", stream=True)
        assert again.status_code == 200
        assert "w0" in next(line for line in again.iter_lines(decode_unicode=True)
                            if line.startswith("data: "))
        again.close()
    finally:
        backend.stop()
