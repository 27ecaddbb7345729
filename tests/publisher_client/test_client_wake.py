"""Wake recipes (http and command: success, failure, timeout), the wait for
the backend, wake tasks, and waking before an infer on a backend that is down."""
import sys
import threading
import time

import pytest
import requests

from publisher_client import Publisher
from publisher_client.backends import OpenAIBackend
from publisher_client.config import LlmConfig, WakeRecipe
from publisher_client.errors import WakeError
from publisher_client.wake import Waker, run_recipe
from tests.publisher_client.helpers import API, BACKEND, calls_to, sent_json, wait_for
from tests.publisher_client.helpers import expect_result as expect_recorded_result

WAKE_URL = "http://wake.test/wake/vllm"


class FlagBackend:
    """Available once `flag` exists (a wake command creates it)."""

    def __init__(self, flag):
        self.flag = flag
        self.probes = 0

    def available(self):
        self.probes += 1
        return self.flag.exists()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def command(*args, **fields):
    return WakeRecipe(type="command", command=sys.executable, args=("-c", *args), **fields)


# -- the http recipe ----------------------------------------------------------

def test_http_recipe_sends_method_headers_and_body(mocked):
    mocked.post(WAKE_URL, status=202)
    recipe = WakeRecipe(type="http", url=WAKE_URL, headers={"Authorization": "Bearer w"},
                        body='{"profile": "qwen3"}')

    run_recipe(recipe, max_seconds=60)

    request = mocked.calls[0].request
    assert request.headers["Authorization"] == "Bearer w"
    assert request.body == '{"profile": "qwen3"}'
    assert request.req_kwargs["timeout"] == (5.0, 30.0)


def test_http_recipe_fails_on_a_non_2xx_answer(mocked):
    mocked.get(WAKE_URL, status=500)

    with pytest.raises(WakeError) as raised:
        run_recipe(WakeRecipe(type="http", url=WAKE_URL, method="GET"), max_seconds=60)

    assert str(raised.value) == "wake request failed with status 500"
    assert raised.value.detail == f"wake request to {WAKE_URL} answered 500"


def test_a_wake_error_never_carries_the_recipe_url(mocked):
    """Its text reaches clients; the URL may hold a token."""
    url = "http://wake.test/wake?token=s3cret"
    mocked.post(url, body=requests.ConnectionError(f"cannot connect to {url}"))

    with pytest.raises(WakeError) as raised:
        run_recipe(WakeRecipe(type="http", url=url), max_seconds=60)

    assert str(raised.value) == "wake request failed"
    assert "s3cret" in raised.value.detail   # the local log keeps it


def test_http_recipe_fails_on_a_timeout(mocked):
    mocked.post(WAKE_URL, body=requests.ReadTimeout("slow"))

    with pytest.raises(WakeError) as raised:
        run_recipe(WakeRecipe(type="http", url=WAKE_URL, timeout_seconds=2), max_seconds=60)

    assert str(raised.value) == "wake request timed out"
    assert "timed out after 2 s" in raised.value.detail


def test_http_recipe_then_waits_for_the_backend(mocked):
    mocked.get(f"{BACKEND}/models", body=requests.ConnectionError("down"))
    mocked.post(WAKE_URL, status=200)
    mocked.get(f"{BACKEND}/models", body=requests.ConnectionError("booting"))
    mocked.get(f"{BACKEND}/models", json={"data": []})
    backend = OpenAIBackend(LlmConfig(name="v", type="openai", model="m", url=BACKEND))
    ticks = []
    waker = Waker("v", backend, WakeRecipe(type="http", url=WAKE_URL),
                  on_tick=lambda: ticks.append(1), interval=0)

    waker.wake()

    assert [c.request.url for c in mocked.calls][1] == WAKE_URL
    assert ticks == [1]   # one wait in between: the publisher heartbeats there


# -- the command recipe ---------------------------------------------------------

def test_command_recipe_runs_and_the_backend_comes_up(tmp_path):
    flag = tmp_path / "up"
    backend = FlagBackend(flag)
    recipe = command("import pathlib, sys; pathlib.Path(sys.argv[1]).touch()", str(flag),
                     max_wait_seconds=5)

    ms = Waker("v", backend, recipe, interval=0.01).wake()

    assert flag.exists() and ms >= 0


def test_command_recipe_fails_on_a_non_zero_exit_with_its_last_error_line_kept_local(tmp_path):
    recipe = command("import sys; sys.stderr.write('starting\\nno GPU found\\n'); sys.exit(3)")

    with pytest.raises(WakeError) as raised:
        Waker("v", FlagBackend(tmp_path / "never"), recipe).wake()

    assert str(raised.value) == "wake command exited 3"
    assert raised.value.detail.endswith("exited with code 3: no GPU found")


def test_command_recipe_is_bounded_by_its_timeout(tmp_path):
    recipe = command("import time; time.sleep(30)", timeout_seconds=0.3)
    started = time.monotonic()

    with pytest.raises(WakeError) as raised:
        Waker("v", FlagBackend(tmp_path / "never"), recipe).wake()

    assert time.monotonic() - started < 5
    assert str(raised.value) == "wake command timed out"
    assert "did not finish within 0.3 s" in raised.value.detail


def test_a_command_that_times_out_is_killed_with_everything_it_started(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    recipe = command("import subprocess, sys, time; "
                     "child = subprocess.Popen([sys.executable, '-c', 'import time; "
                     "time.sleep(30)']); open(sys.argv[1], 'w').write(str(child.pid)); "
                     "time.sleep(30)", str(pidfile), timeout_seconds=1.0)

    with pytest.raises(WakeError):
        Waker("v", FlagBackend(tmp_path / "never"), recipe).wake()

    grandchild = int(pidfile.read_text())
    wait_for(lambda: not _running(grandchild), timeout=3, what="the grandchild to be killed")


def _running(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has ended
    except FileNotFoundError:
        return False


def test_command_recipe_that_does_not_exist_fails_cleanly(tmp_path):
    recipe = WakeRecipe(type="command", command=str(tmp_path / "no-such-script"))

    with pytest.raises(WakeError, match="could not start"):
        Waker("v", FlagBackend(tmp_path / "never"), recipe).wake()


def test_a_command_that_leaves_a_server_running_in_the_background_does_not_hang(tmp_path):
    """The backgrounded child keeps stdout and stderr open; the wake must not wait for it."""
    flag = tmp_path / "up"
    script = tmp_path / "start.sh"
    script.write_text(f"#!/bin/sh\n(sleep 30; echo late) &\ntouch {flag}\n")
    script.chmod(0o755)
    started = time.monotonic()

    Waker("v", FlagBackend(flag), WakeRecipe(type="command", command=str(script)),
          interval=0.01).wake()

    assert time.monotonic() - started < 5


# -- waiting for the backend ------------------------------------------------------

def test_a_backend_that_never_comes_up_fails_the_wake_after_max_wait(tmp_path):
    clock = FakeClock()
    ticks = []
    waker = Waker("vllm-local", FlagBackend(tmp_path / "never"),
                  command("pass", max_wait_seconds=10), on_tick=lambda: ticks.append(1),
                  interval=1.0, clock=clock, sleep=clock.sleep)

    with pytest.raises(WakeError, match="LLM 'vllm-local' did not come up within 10 s"):
        waker.wake()

    assert len(ticks) == 10


def test_a_backend_already_up_is_not_woken_again(tmp_path):
    flag = tmp_path / "up"
    flag.touch()
    recipe = command("raise SystemExit(1)")   # would fail if it ran

    assert Waker("v", FlagBackend(flag), recipe).wake() == 0


def test_concurrent_wakes_run_the_recipe_once(tmp_path):
    flag, runs = tmp_path / "up", tmp_path / "runs"
    recipe = command("import pathlib, sys, time; time.sleep(0.2); "
                     "open(sys.argv[2], 'a').write('x'); pathlib.Path(sys.argv[1]).touch()",
                     str(flag), str(runs))
    waker = Waker("v", FlagBackend(flag), recipe, interval=0.01)
    threads = [threading.Thread(target=waker.wake) for _ in range(3)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert runs.read_text() == "x"


# -- wake tasks from the server ------------------------------------------------------

def wake_publisher(make_config, wake):
    config = make_config(llms=[{"name": "vllm-local", "type": "openai", "url": BACKEND,
                                "model": "m", "wake": wake}])
    publisher = Publisher(config)
    publisher.session_id = "sess-1"
    return publisher


def expect_result(mocked, task_id="w1"):
    return expect_recorded_result(mocked, task_id)


def test_a_wake_task_runs_the_recipe_and_posts_ok_with_ms(make_config, mocked):
    mocked.get(f"{BACKEND}/models", status=503)
    mocked.post(WAKE_URL, status=200)
    mocked.get(f"{BACKEND}/models", json={"data": []})
    mocked.post(f"{API}/publishers/sess-1/heartbeat", json={"ok": True})
    posted = expect_result(mocked)

    wake_publisher(make_config, {"type": "http", "url": WAKE_URL}).dispatch(
        {"kind": "wake", "task_id": "w1", "llm": "vllm-local"})

    assert posted.wait(5)
    result = sent_json(calls_to(mocked, "POST", "/tasks/w1/result")[0])
    assert result["status"] == 200 and result["body"]["ok"] is True
    assert isinstance(result["body"]["ms"], int)
    assert calls_to(mocked, "POST", "/heartbeat")   # the rows are fresh when the wake ends


def test_a_failed_wake_task_posts_the_error(make_config, mocked):
    mocked.get(f"{BACKEND}/models", status=503)
    mocked.post(WAKE_URL, status=500)
    posted = expect_result(mocked)

    wake_publisher(make_config, {"type": "http", "url": WAKE_URL}).dispatch(
        {"kind": "wake", "task_id": "w1", "llm": "vllm-local"})

    assert posted.wait(5)
    assert sent_json(calls_to(mocked, "POST", "/tasks/w1/result")[0]) == \
        {"error": "wake request failed with status 500"}


def test_a_wake_task_for_an_llm_without_recipe_posts_an_error(make_config, mocked):
    publisher = Publisher(make_config())
    posted = expect_result(mocked)

    publisher.dispatch({"kind": "wake", "task_id": "w1", "llm": "vllm-local"})

    assert posted.wait(5)
    assert sent_json(mocked.calls[0]) == {"error": "LLM 'vllm-local' has no wake recipe"}


def test_an_infer_on_a_backend_that_is_down_wakes_it_first(make_config, mocked):
    completion = {"object": "chat.completion", "choices": []}
    mocked.post(f"{BACKEND}/chat/completions", body=requests.ConnectionError("refused"))
    mocked.get(f"{BACKEND}/models", body=requests.ConnectionError("refused"))
    mocked.post(WAKE_URL, status=200)
    mocked.get(f"{BACKEND}/models", json={"data": []})
    mocked.post(f"{BACKEND}/chat/completions", json=completion)
    posted = expect_result(mocked, "t1")

    wake_publisher(make_config, {"type": "http", "url": WAKE_URL}).dispatch(
        {"kind": "infer", "task_id": "t1", "llm": "vllm-local", "streaming": False,
         "body": {"messages": [{"role": "user", "content": "hi"}]}})

    assert posted.wait(5)
    assert sent_json(calls_to(mocked, "POST", "/tasks/t1/result")[0]) == \
        {"status": 200, "body": completion}
    assert calls_to(mocked, "POST", WAKE_URL)


def test_an_infer_whose_wake_fails_posts_the_wake_error(make_config, mocked):
    mocked.post(f"{BACKEND}/chat/completions", body=requests.ConnectionError("refused"))
    mocked.get(f"{BACKEND}/models", body=requests.ConnectionError("refused"))
    mocked.post(WAKE_URL, status=503)
    posted = expect_result(mocked, "t1")

    wake_publisher(make_config, {"type": "http", "url": WAKE_URL}).dispatch(
        {"kind": "infer", "task_id": "t1", "llm": "vllm-local", "streaming": False,
         "body": {"messages": [{"role": "user", "content": "hi"}]}})

    assert posted.wait(5)
    wait_for(lambda: calls_to(mocked, "POST", "/tasks/t1/result"))
    assert sent_json(calls_to(mocked, "POST", "/tasks/t1/result")[0]) == \
        {"error": "wake request failed with status 503"}
