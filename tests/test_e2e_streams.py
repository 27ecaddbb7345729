"""Many streams through one publisher at a real model's pace, end to end:
the real server under gunicorn + gevent, the real `python -m
publisher_client run`, and fake backends on loopback that stream a word
every 20 ms. Every stream's chunks travel in the session's shared chunk
POSTs (DESIGN.md, "Streams at a real model's pace")."""
import json
import threading

import pytest
import requests

from tests.publisher_client.helpers import PublisherProcess, SlowStreamBackend
from tests.support.fake_openai import FakeOpenAI
from tests.support.waiting import wait_until

PACE = 0.02


@pytest.fixture
def paced_backend():
    with FakeOpenAI(chunk_delay=PACE) as fake:   # echoes the last message, a word at a time
        yield fake


@pytest.fixture
def publisher_process(tmp_path):
    started = []

    def start(server, llms):
        publisher = PublisherProcess(server, tmp_path, llms, heartbeat_seconds=5)
        started.append(publisher)
        return publisher.start()
    yield start
    for publisher in started:
        publisher.stop()


def words(n, count):
    return " ".join(f"s{n}w{i}" for i in range(count))


def open_stream(server, llm, text):
    response = requests.post(f"{server.url}/v1/chat/completions", headers=server.headers("client"),
                             stream=True, timeout=(5, 60), json={
                                 "model": llm, "stream": True,
                                 "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    return response


class StreamReader(threading.Thread):
    """Reads one stream to its end: `text` (the deltas joined), `dones` (how
    many `[DONE]`), `first` set at its first chunk, `error` if it failed."""

    def __init__(self, server, llm, text):
        super().__init__(daemon=True)
        self.server, self.llm, self.sent = server, llm, text
        self.first = threading.Event()
        self.text, self.dones, self.error = "", 0, None

    def run(self):
        try:
            with open_stream(self.server, self.llm, self.sent) as response:
                for line in response.iter_lines(decode_unicode=True):
                    if not line.startswith("data: "):
                        continue
                    self.first.set()
                    payload = line[len("data: "):]
                    if payload == "[DONE]":
                        self.dones += 1
                        continue
                    for choice in json.loads(payload).get("choices") or ():
                        self.text += (choice.get("delta") or {}).get("content") or ""
        except Exception as exc:  # noqa: BLE001 - the test reports it
            self.error = exc
        finally:
            self.first.set()


def read_all(readers, timeout=60):
    for reader in readers:
        reader.join(timeout)
    assert not any(reader.is_alive() for reader in readers), "a stream never ended"
    assert [reader.error for reader in readers] == [None] * len(readers)
    mismatched = [(reader.sent, reader.text, reader.dones) for reader in readers
                  if (reader.text, reader.dones) != (reader.sent, 1)]
    assert not mismatched, f"{len(mismatched)} streams lost, doubled or reordered text: " \
                           f"{mismatched[:3]}"


def test_concurrent_streams_of_one_session_arrive_whole_and_a_cancel_stops_only_its_own(
        module_live_server, publisher_process, paced_backend):
    server = module_live_server
    endless = SlowStreamBackend(chunks=1500, interval=PACE)   # 30 s unless stopped
    try:
        publisher = publisher_process(server, [
            {"name": "streams-paced", "type": "openai", "url": paced_backend.url,
             "model": "fake-model", "max_concurrency": 64},
            {"name": "streams-endless", "type": "openai", "url": endless.url,
             "model": "slow", "max_concurrency": 2}])
        leaving = open_stream(server, "streams-endless", "a long story")
        lines = leaving.iter_lines()
        wait_until(lambda: next(lines).startswith(b"data: "), timeout=15,
                   message="the endless stream's first chunk")
        readers = [StreamReader(server, "streams-paced", words(n, 24)) for n in range(24)]
        for reader in readers:
            reader.start()
        wait_until(lambda: all(reader.first.is_set() for reader in readers), timeout=30,
                   message="every paced stream's first chunk")

        leaving.close()   # one client goes away while the others stream

        assert endless.disconnected.wait(10), publisher.log_text()
        read_all(readers)
        assert endless.chunks_sent < 1000
        publisher.wait_for_log("the client went away")
        assert publisher.log_text().count("the client went away") == 1
    finally:
        endless.stop()


def test_128_paced_streams_through_one_publisher_and_one_worker_arrive_whole_and_in_order(
        live_server_factory, publisher_process, paced_backend):
    server = live_server_factory({"WEB_CONCURRENCY": "1"})
    publisher_process(server, [{"name": "streams-128", "type": "openai",
                                "url": paced_backend.url, "model": "fake-model",
                                "max_concurrency": 128}])
    readers = [StreamReader(server, "streams-128", words(n, 32)) for n in range(128)]
    for reader in readers:
        reader.start()
    read_all(readers, timeout=90)
