"""The status page in a real browser: headless Chromium (Debian's), driven over
the DevTools protocol, in front of a live server (gunicorn + gevent) with a
publisher polling, a task in flight, usage and an error to show.

Needs Debian's `chromium`: skipped without it locally, a failure under CI
(`.ci/run` installs it). The screenshot is left at <tmp_path>/status.png.
"""
import threading

import pytest
import requests

from tests.support.chromium import chromium_binary, headless_chromium
from tests.support.waiting import wait_until

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(autouse=True)
def chromium_installed():
    chromium_binary()


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture
def server(live_server_factory):
    return live_server_factory({"SWITCHBOARD_INFER_TIMEOUT": "60"})


class PollingPublisher:
    """A publisher that polls and takes tasks but never answers them: they stay in flight."""

    def __init__(self, server, http, llm):
        self.server, self.http = server, http
        self.headers = server.headers("publisher")
        registered = http.post(f"{server.url}/api/v1/publishers/register", headers=self.headers,
                               json={"llms": [{"name": llm, "model": "qwen-local",
                                               "max_concurrency": 2}]}, timeout=10)
        assert registered.status_code == 201, registered.text
        self.session_id = registered.json()["session_id"]
        self.tasks = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        with requests.Session() as http:
            http.trust_env = False
            while not self.stop.is_set():
                try:
                    response = http.get(
                        f"{self.server.url}/api/v1/publishers/{self.session_id}/tasks",
                        params={"wait": 1}, headers=self.headers, timeout=10)
                    self.tasks += response.json().get("tasks", [])
                except requests.RequestException:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(15)
        self.http.delete(f"{self.server.url}/api/v1/publishers/{self.session_id}",
                         headers=self.headers, timeout=10)


@pytest.fixture
def scene(server, http, fake_openai):
    """Rows, a live session with a task in flight, usage and a recent error."""
    admin, client = server.headers("admin"), server.headers("client")
    assert http.post(f"{server.url}/api/v1/llms", headers=admin, timeout=10, json={
        "name": "upstream-gpt", "model": "gpt-4o-mini", "url": fake_openai.url,
        "max_concurrency": 8}).status_code == 201
    assert http.post(f"{server.url}/api/v1/llms/upstream-gpt/infer", headers=client, json=CHAT,
                     timeout=10).status_code == 200
    publisher = PollingPublisher(server, http, "gpu-box")
    assert http.post(f"{server.url}/api/v1/agents", headers=admin, timeout=10, json={
        "name": "reviewer", "llm": "gpu-box", "system_prompt": "You review."}).status_code == 201
    waiting = threading.Thread(target=lambda: http.post(
        f"{server.url}/api/v1/llms/gpu-box/infer", headers=client, json=CHAT, timeout=60),
        daemon=True)
    waiting.start()
    wait_until(lambda: publisher.tasks, timeout=10, message="the publisher got the task")
    gone = http.post(f"{server.url}/api/v1/publishers/register", headers=server.headers(
        "publisher"), json={"llms": [{"name": "old-box", "model": "m"}]}, timeout=10).json()
    http.delete(f"{server.url}/api/v1/publishers/{gone['session_id']}",
                headers=server.headers("publisher"), timeout=10)
    assert http.post(f"{server.url}/api/v1/llms/old-box/infer", headers=client, json=CHAT,
                     timeout=10).status_code == 503
    wait_until(lambda: http.get(f"{server.url}/api/v1/usage", headers=admin, timeout=10).json(),
               timeout=10, message="usage written")
    yield publisher
    publisher.close()
    waiting.join(15)


def test_an_admin_signs_in_and_sees_the_live_rows(server, scene, tmp_path):
    with headless_chromium(tmp_path) as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requested = []
        page.on("request", lambda request: requested.append(request.url))

        page.goto(f"{server.url}/status")
        assert page.url == f"{server.url}/status/login"

        page.fill("#token", "sb_wrong")
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert "not valid" in page.inner_text("#login-error")

        page.fill("#token", server.tokens["client"])
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert "not an admin token" in page.inner_text("#login-error")

        page.fill("#token", server.tokens["admin"])
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert page.url == f"{server.url}/status"

        box = page.locator('tr[data-llm="gpu-box"]')
        assert "virtual" in box.inner_text() and "active" in box.inner_text()
        assert box.locator("td.num").all_inner_texts()[:3] == ["1", "0", "2"]  # in flight
        assert "public" in page.inner_text('tr[data-llm="upstream-gpt"]')
        assert "inactive" in page.inner_text('tr[data-llm="old-box"]')
        agent = page.locator('tr[data-agent="reviewer"]')
        assert "gpu-box" in agent.inner_text() and "qwen-local" in agent.inner_text()
        assert agent.locator("td.num").all_inner_texts() == ["1", "0"]  # its LLM's task
        session_row = page.locator(f'tr[data-session="{scene.session_id}"]')
        assert "live" in session_row.inner_text() and "publisher" in session_row.inner_text()
        usage = page.inner_text('tr[data-usage="client/upstream-gpt"]')
        assert usage.split("\t")[2:4] == ["1", "0"]  # one request, no error
        errors = page.inner_text("#errors")
        assert "503" in errors and "/api/v1/llms/old-box/infer" in errors

        # The cookie is HttpOnly: no script on the page can read it.
        assert page.evaluate("document.cookie") == ""
        for raw in server.tokens.values():
            assert raw not in page.content()

        page.screenshot(path=str(tmp_path / "status.png"), full_page=True)

        # It refreshes itself (meta refresh, every 10 s).
        before = page.inner_text("#generated-at")
        with page.expect_navigation(timeout=20_000):
            pass
        assert page.url == f"{server.url}/status"
        assert page.inner_text("#generated-at") != before

        # Everything the browser asked for came from this server.
        assert requested and all(url.startswith(server.url + "/") for url in requested), requested
        page.close()
