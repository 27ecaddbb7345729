"""A minimal publisher speaking the long-poll protocol over HTTP, for tests.

    publisher = ProtocolPublisher(server, [{"name": "m1", "model": "x"}], handler)
    publisher.start()          # registers, then polls in a thread
    ...
    publisher.stop()

`handler(publisher, task)` runs in its own thread per task; the default
answers an infer with `{status: 200, body: {"echo": <body>}}` and a wake
with `{status: 200, body: {"ok": True}}`.
"""
import threading

import requests

TIMEOUT = (3.05, 30)


def default_handler(publisher, task):
    if task["kind"] == "wake":
        publisher.result(task["task_id"], status=200, body={"ok": True})
    elif task["kind"] == "infer":
        publisher.result(task["task_id"], status=200, body={"echo": task["body"]})


class ProtocolPublisher:
    def __init__(self, server, llms, handler=default_handler, *, agents=(), role="publisher",
                 session_id=None, wait=20):
        self.server = server
        self.llms = list(llms)
        self.agents = list(agents)
        self.handler = handler
        self.headers = server.headers(role)
        self.session_id = session_id
        self.wait = wait
        self.http = requests.Session()
        self.http.trust_env = False
        self.tasks_seen = []
        self.cancels = []
        self.poll_errors = []
        self._stopping = threading.Event()
        self._thread = None

    def api(self, method, path, **kwargs):
        return self.http.request(method, f"{self.server.url}/api/v1{path}",
                                 headers=self.headers, timeout=TIMEOUT, **kwargs)

    def register(self, **extra):
        response = self.api("POST", "/publishers/register", json={
            "session_id": self.session_id, "llms": self.llms, "agents": self.agents, **extra})
        assert response.status_code == 201, response.text
        self.session_id = response.json()["session_id"]
        return response.json()

    def poll(self, wait=None):
        response = self.api("GET", f"/publishers/{self.session_id}/tasks",
                            params={"wait": self.wait if wait is None else wait})
        response.raise_for_status()
        return response.json()["tasks"]

    def result(self, task_id, **outcome):
        return self.api("POST", f"/tasks/{task_id}/result", json=outcome)

    def chunks(self, task_id, chunks, *, seq=None, done=False):
        """`chunks`: data strings, or {"data", "event"} entries."""
        body = {"chunks": [c if isinstance(c, dict) else {"data": c} for c in chunks],
                "done": done}
        if seq is not None:
            body["seq"] = seq
        return self.api("POST", f"/tasks/{task_id}/chunks", json=body)

    def start(self):
        """Register (keeping a sticky `session_id` if given), then poll in a thread."""
        self.register()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self, disconnect=False):
        self._stopping.set()
        if disconnect:
            self.api("DELETE", f"/publishers/{self.session_id}")
        if self._thread:
            self._thread.join(self.wait + 5)

    def _run(self):
        while not self._stopping.is_set():
            try:
                tasks = self.poll(wait=1.0)
            except requests.RequestException as exc:  # a server outage: poll again shortly
                self.poll_errors.append(exc)
                self._stopping.wait(0.2)
                continue
            for task in tasks:
                self.tasks_seen.append(task)
                if task["kind"] == "cancel":
                    self.cancels.append(task["task_id"])
                    continue
                threading.Thread(target=self.handler, args=(self, task), daemon=True).start()
