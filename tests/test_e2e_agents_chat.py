"""Agents and chat end to end: the real server (gunicorn + gevent), a FakeOpenAI
upstream, and for virtual agents the real publisher (`python -m
publisher_client run`) whose backend is that same FakeOpenAI."""
import json
import os
import subprocess
import sys
import time

import openai
import pytest
import requests

from tests.support.live import REPO_ROOT

TIMEOUT = (3.05, 30)


@pytest.fixture(scope="module")
def server(module_live_server):
    return module_live_server


@pytest.fixture
def fake(module_fake_openai):
    module_fake_openai.reset()
    return module_fake_openai


@pytest.fixture(scope="module")
def http():
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever the outer proxy settings
    yield session
    session.close()


@pytest.fixture
def api(server, http):
    """api(role, method, path, **kwargs) → response from /api/v1 with that role's token."""
    def call(role, method, path, headers=None, **kwargs):
        return http.request(method, f"{server.url}/api/v1{path}", timeout=TIMEOUT,
                            headers=headers or server.headers(role), **kwargs)
    return call


@pytest.fixture
def public_agent(api, fake):
    """create(name) → a public agent on its own public LLM upstream of the fake."""
    def create(name, **fields):
        llm = api("admin", "POST", "/llms", json={"name": f"{name}-llm", "model": "gpt-fake",
                                                   "url": fake.url, "api_key": "sk-fake"})
        assert llm.status_code == 201, llm.text
        agent = api("admin", "POST", "/agents", json={"name": name, "llm": f"{name}-llm",
                                                      **fields})
        assert agent.status_code == 201, agent.text
        return name
    return create


def chat_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
            if line.startswith("data: ")]


def messages(api, thread_id, role="admin"):
    response = api(role, "GET", f"/threads/{thread_id}/messages")
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"], m["status"]) for m in response.json()]


def test_public_agent_chat_sends_its_persona_upstream_and_keeps_history(
        api, fake, public_agent):
    public_agent("e2e-reviewer", system_prompt="You review diffs.",
                 default_params={"temperature": 0.2, "max_tokens": 64})
    first = api("client", "POST", "/agents/e2e-reviewer/chat", json={"message": "first turn"})
    assert first.status_code == 200, first.text
    thread_id = first.json()["thread_id"]
    assert first.json()["assistant"] == "first turn"  # the fake echoes the user

    second = api("client", "POST", "/agents/e2e-reviewer/chat", json={
        "message": "second turn", "thread_id": thread_id, "params": {"temperature": 0.9}})
    assert second.json()["assistant"] == "second turn"

    events = chat_events(api("client", "POST", "/agents/e2e-reviewer/chat", stream=True, json={
        "message": "third turn streamed", "thread_id": thread_id, "stream": True}))
    assert "".join(e["delta"] for e in events if e["type"] == "text") == "third turn streamed"
    assert events[-1] == {"type": "final", "thread_id": thread_id,
                          "message_id": events[-1]["message_id"], "tool_calls": None,
                          "usage": None}

    sent = [r["json"] for r in fake.chat_requests]
    assert sent[0]["messages"] == [{"role": "system", "content": "You review diffs."},
                                   {"role": "user", "content": "first turn"}]
    assert (sent[0]["temperature"], sent[0]["max_tokens"], sent[0]["model"]) == (
        0.2, 64, "gpt-fake")
    assert (sent[1]["temperature"], sent[1]["max_tokens"]) == (0.9, 64)
    assert sent[1]["messages"][1:] == [
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": "first turn"},
        {"role": "user", "content": "second turn"}]
    assert len(sent[2]["messages"]) == 1 + 5 and sent[2]["stream"] is True
    assert fake.chat_requests[0]["headers"]["Authorization"] == "Bearer sk-fake"
    assert [m[2] for m in messages(api, thread_id)] == ["complete"] * 6


def test_threads_are_private_between_two_client_tokens(server, api, fake, public_agent):
    public_agent("e2e-private")
    second = server.flask("tokens", "create", "e2e-client-2", "--role", "client").stdout.strip()
    other = {"Authorization": f"Bearer {second}"}
    mine = api("client", "POST", "/agents/e2e-private/chat", json={"message": "secret"}).json()
    theirs = api(None, "POST", "/agents/e2e-private/chat", headers=other,
                 json={"message": "theirs"}).json()

    listed = api(None, "GET", "/agents/e2e-private/threads", headers=other).json()
    assert [t["id"] for t in listed] == [theirs["thread_id"]]
    assert api(None, "GET", f"/threads/{mine['thread_id']}/messages",
               headers=other).status_code == 403
    assert api(None, "POST", "/agents/e2e-private/chat", headers=other, json={
        "message": "let me in", "thread_id": mine["thread_id"]}).status_code == 403
    every = api("admin", "GET", "/agents/e2e-private/threads").json()
    assert {t["id"] for t in every} == {mine["thread_id"], theirs["thread_id"]}
    assert messages(api, mine["thread_id"]) == [("user", "secret", "complete"),
                                                ("assistant", "secret", "complete")]


def test_a_failed_inference_leaves_the_user_message_and_an_error_message(
        api, fake, public_agent):
    public_agent("e2e-failing")
    fake.script(status=500, body={"error": {"message": "backend exploded"}})
    response = api("client", "POST", "/agents/e2e-failing/chat", json={"message": "hello?"})
    assert response.status_code == 502
    assert "backend exploded" in response.json()["error"]["message"]
    thread_id = api("client", "GET", "/agents/e2e-failing/threads").json()[0]["id"]
    assert messages(api, thread_id) == [("user", "hello?", "complete"),
                                        ("assistant", "", "error")]

    fake.script(chunks=["partial", " answer", " never finished"], break_after=1)
    events = chat_events(api("client", "POST", "/agents/e2e-failing/chat", stream=True, json={
        "message": "again", "thread_id": thread_id, "stream": True}))
    assert events[0] == {"type": "text", "delta": "partial"}
    assert events[-1]["type"] == "error"
    assert messages(api, thread_id)[2:] == [("user", "again", "complete"),
                                            ("assistant", "partial", "error")]


def test_a_client_leaving_a_streamed_chat_leaves_an_error_message(server, http, api, fake,
                                                                 public_agent):
    public_agent("e2e-leaving")
    fake.script(chunks=[f"word{i} " for i in range(20)], chunk_delay=0.2)
    response = http.post(f"{server.url}/api/v1/agents/e2e-leaving/chat", stream=True,
                         timeout=TIMEOUT, headers=server.headers("client"),
                         json={"message": "talk slowly", "stream": True})
    first = next(line for line in response.iter_lines(decode_unicode=True) if line)
    assert json.loads(first[6:]) == {"type": "text", "delta": "word0 "}
    response.close()  # hang up mid-answer
    thread_id = api("client", "GET", "/agents/e2e-leaving/threads").json()[0]["id"]

    def settled():
        return messages(api, thread_id)[-1][2] != "pending"

    assert wait_for(settled, timeout=10)
    role, content, status = messages(api, thread_id)[-1]
    assert (role, status) == ("assistant", "error")
    assert content.startswith("word0 ") and "word19" not in content


def test_deleting_an_llm_with_a_public_agent_is_409(api, public_agent):
    public_agent("e2e-pinned")
    refused = api("admin", "DELETE", "/llms/e2e-pinned-llm")
    assert refused.status_code == 409
    assert refused.json()["error"]["details"] == {"agents": ["e2e-pinned"]}
    assert api("admin", "GET", "/llms/e2e-pinned-llm").status_code == 200


def test_the_openai_sdk_talks_to_an_agent_through_v1(server, fake, public_agent):
    public_agent("e2e-sdk", system_prompt="Answer briefly.", default_params={"max_tokens": 32})
    with openai.OpenAI(base_url=server.url + "/v1", api_key=server.tokens["client"],
                       max_retries=0, timeout=10) as sdk:
        assert "agent:e2e-sdk" in [m.id for m in sdk.models.list()]
        reply = sdk.chat.completions.create(model="agent:e2e-sdk",
                                            messages=[{"role": "user", "content": "ping"}])
        assert reply.choices[0].message.content == "ping"
        stream = sdk.chat.completions.create(model="agent:e2e-sdk", stream=True,
                                             messages=[{"role": "user", "content": "pong pong"}])
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "pong pong"
    sent = fake.chat_requests[0]["json"]
    assert sent["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert (sent["max_tokens"], sent["model"]) == (32, "gpt-fake")


# -- a virtual agent, published by the real publisher ---------------------------

@pytest.fixture
def run_publisher(server, fake, tmp_path):
    """Start `python -m publisher_client run` publishing LLM `<name>-llm` (an
    openai backend on the fake) and agent `<name>`; stop it with SIGTERM."""
    started = []

    def start(name, **agent):
        config = {"server": server.url, "token_env": "SWITCHBOARD_TOKEN",
                  "session_file": str(tmp_path / f"{name}-session.json"),
                  "heartbeat_seconds": 5, "poll_wait_seconds": 5,
                  "llms": [{"name": f"{name}-llm", "type": "openai", "url": fake.url,
                            "model": "local-model"}],
                  "agents": [{"name": name, "llm": f"{name}-llm", **agent}]}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["SWITCHBOARD_TOKEN"] = server.tokens["publisher"]
        process = subprocess.Popen(
            [sys.executable, "-m", "publisher_client", "run", "--config", str(path)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_virtual_agent_of_a_publisher_answers_chat_streamed_and_not(
        api, fake, run_publisher):
    publisher = run_publisher("e2e-local-coder", system_prompt="You write code.",
                              default_params={"temperature": 0.1})

    def published():
        response = api("client", "GET", "/agents/e2e-local-coder")
        return response.status_code == 200 and response.json()["status"] == "active"

    if not wait_for(published):
        publisher.kill()
        pytest.fail("the agent was never published:\n" + publisher.communicate()[0])
    view = api("client", "GET", "/agents/e2e-local-coder").json()
    assert (view["kind"], view["llm"]) == ("virtual", "e2e-local-coder-llm")

    answer = api("client", "POST", "/agents/e2e-local-coder/chat",
                 json={"message": "write a loop"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["assistant"] == "write a loop"
    thread_id = answer.json()["thread_id"]

    events = chat_events(api("client", "POST", "/agents/e2e-local-coder/chat", stream=True, json={
        "message": "now stream it", "thread_id": thread_id, "stream": True}))
    assert "".join(e["delta"] for e in events if e["type"] == "text") == "now stream it"
    assert events[-1]["type"] == "final"

    sent = [r["json"] for r in fake.chat_requests]  # what the publisher's backend received
    assert sent[0]["messages"] == [{"role": "system", "content": "You write code."},
                                   {"role": "user", "content": "write a loop"}]
    assert (sent[0]["temperature"], sent[0]["model"]) == (0.1, "local-model")
    assert sent[1]["messages"][1:] == [{"role": "user", "content": "write a loop"},
                                       {"role": "assistant", "content": "write a loop"},
                                       {"role": "user", "content": "now stream it"}]
    assert sent[1]["stream"] is True
    assert [m[2] for m in messages(api, thread_id)] == ["complete"] * 4

    publisher.terminate()  # SIGTERM: the publisher disconnects its session
    assert publisher.wait(10) == 0
    offline = api("client", "POST", "/agents/e2e-local-coder/chat",
                  json={"message": "still there?", "thread_id": thread_id})
    assert offline.status_code == 503
    assert offline.json()["error"]["code"] == "publisher_offline"
    assert len(messages(api, thread_id)) == 4  # refused up front: nothing to record
