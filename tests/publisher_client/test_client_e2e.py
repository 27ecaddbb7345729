"""End to end: the real server under gunicorn + gevent and the real
`python -m publisher_client run` process, talking over loopback HTTP."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.publisher_client.helpers import PublisherProcess, SlowStreamBackend, wait_for
from tests.support.live import free_port

SLEEPY_BACKEND = Path(__file__).with_name("sleepy_backend.py")


@pytest.fixture(scope="module")
def server(module_live_server):
    return module_live_server


@pytest.fixture
def publishers(server, tmp_path):
    """publishers(llms, agents=(), name=...) → a started PublisherProcess,
    killed at teardown if the test left it running."""
    started = []

    def start(llms, agents=(), name="publisher", **settings):
        publisher = PublisherProcess(server, tmp_path, llms, agents, name=name,
                                     heartbeat_seconds=5, **settings)
        started.append(publisher)
        return publisher.start()
    yield start
    for publisher in started:
        publisher.stop()


def llm_row(server, name) -> dict:
    response = requests.get(f"{server.url}/api/v1/llms/{name}", headers=server.headers("client"),
                            timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def infer(server, name, content, stream=False, **kwargs):
    return requests.post(f"{server.url}/api/v1/llms/{name}/infer",
                         headers=server.headers("client"), stream=stream, timeout=(5, 60),
                         json={"model": "ignored", "stream": stream,
                               "messages": [{"role": "user", "content": content}]}, **kwargs)


def sse_payloads(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines(decode_unicode=True)
            if line.startswith("data: ")]


def streamed_text(payloads) -> str:
    return "".join(json.loads(p)["choices"][0]["delta"].get("content") or ""
                   for p in payloads if p != "[DONE]")


def test_echo_backend_answers_plain_and_streamed_with_its_agent_published(server, publishers):
    publishers([{"name": "e2e-echo", "type": "echo"}],
               agents=[{"name": "e2e-echo-agent", "llm": "e2e-echo",
                        "system_prompt": "Repeat after me."}])

    row = llm_row(server, "e2e-echo")
    assert (row["kind"], row["status"]) == ("virtual", "active")
    agent = requests.get(f"{server.url}/api/v1/agents/e2e-echo-agent",
                         headers=server.headers("client"), timeout=10).json()
    assert agent["kind"] == "virtual" and agent["status"] == "active"

    plain = infer(server, "e2e-echo", "hello from the other side")
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "hello from the other side"

    streamed = infer(server, "e2e-echo", "one two three four", stream=True)
    assert streamed.status_code == 200
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    payloads = sse_payloads(streamed)
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
    assert streamed_text(payloads) == "one two three four"


def test_openai_backend_is_relayed_plain_and_streamed(server, publishers, fake_openai):
    publishers([{"name": "e2e-openai", "type": "openai", "url": fake_openai.url,
                 "model": "fake-model", "tier": "heavy"}])

    plain = infer(server, "e2e-openai", "say hi")
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "say hi"
    assert fake_openai.chat_requests[-1]["json"]["model"] == "fake-model"

    fake_openai.script(chunks=["Hel", "lo", " there"], chunk_delay=0.05)
    streamed = infer(server, "e2e-openai", "ignored", stream=True)
    payloads = sse_payloads(streamed)
    assert streamed_text(payloads) == "Hello there"
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"

    fake_openai.script(status=400, body={"error": {"message": "context too long"}})
    refused = infer(server, "e2e-openai", "too long")
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "context too long"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_disconnects_and_the_rows_go_inactive(server, publishers, signum):
    name = f"e2e-stop-{signum.name.lower()}"
    publisher = publishers([{"name": name, "type": "echo"}], name=name)
    assert llm_row(server, name)["status"] == "active"

    publisher.process.send_signal(signum)

    assert publisher.process.wait(15) == 0
    assert "disconnected session" in publisher.log_text()
    assert llm_row(server, name)["status"] == "inactive"
    assert infer(server, name, "anyone?").status_code == 503


def test_sigkill_then_restart_keeps_the_session_and_rows(server, publishers):
    publisher = publishers([{"name": "e2e-kill", "type": "echo"}], name="kill")
    before = llm_row(server, "e2e-kill")

    publisher.kill()
    publisher.start()

    after = llm_row(server, "e2e-kill")
    assert after["provider_session_id"] == before["provider_session_id"]
    assert after["id"] == before["id"]
    assert after["status"] == "active"
    saved = json.loads(publisher.session_file.read_text())
    assert saved["session_id"] == before["provider_session_id"]
    wait_for(lambda: infer(server, "e2e-kill", "still here").status_code == 200, timeout=15,
             what="the restarted publisher to answer")


def test_a_restart_after_sigterm_takes_the_same_rows_back(server, publishers):
    publisher = publishers([{"name": "e2e-restart", "type": "echo"}], name="restart")
    before = llm_row(server, "e2e-restart")
    assert publisher.terminate() == 0

    publisher.start()

    after = llm_row(server, "e2e-restart")
    assert (after["id"], after["provider_session_id"], after["status"]) == \
        (before["id"], before["provider_session_id"], "active")
    assert infer(server, "e2e-restart", "back again").status_code == 200


def test_command_wake_recipe_starts_a_stopped_backend_on_the_first_request(
        server, publishers, tmp_path):
    port, pid_file = free_port(), tmp_path / "backend.pid"
    publishers([{"name": "e2e-sleepy", "type": "openai", "url": f"http://127.0.0.1:{port}/v1",
                 "model": "sleepy",
                 "wake": {"type": "command", "command": sys.executable,
                          "args": [str(SLEEPY_BACKEND), "start", str(port), str(pid_file)],
                          "max_wait_seconds": 20}}], name="sleepy")
    try:
        assert llm_row(server, "e2e-sleepy")["status"] == "hibernating"

        answer = infer(server, "e2e-sleepy", "good morning")

        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "awake: good morning"
        assert llm_row(server, "e2e-sleepy")["status"] == "active"
        assert pid_file.exists()
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_a_client_that_hangs_up_stops_the_backend_stream(server, publishers):
    backend = SlowStreamBackend(chunks=1000, interval=0.02)   # 20 s if nobody stops it
    try:
        publisher = publishers([{"name": "e2e-slow", "type": "openai", "url": backend.url,
                                 "model": "slow"}], name="slow")
        response = infer(server, "e2e-slow", "tell me a long story", stream=True)
        lines = response.iter_lines()
        for _ in range(10):
            next(lines)

        response.close()   # the client goes away mid-stream
        hung_up = time.monotonic()

        assert backend.disconnected.wait(10), publisher.log_text()
        assert time.monotonic() - hung_up < 5
        assert backend.chunks_sent < 500
        publisher.wait_for_log("the client went away")
    finally:
        backend.stop()
