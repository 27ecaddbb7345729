"""The Switchboard side of the publisher protocol, one method per endpoint.

Errors come back as exceptions: ServerUnavailable (unreachable, timed out,
5xx, 429: retry later), SessionNotFound (a 404 whose code is
session_not_found: register again), TaskGone (stop work on the task),
ServerError (anything else; not worth retrying).
"""

import requests
from requests.adapters import HTTPAdapter

from publisher_client import __version__
from publisher_client.environment import read_environment_once
from publisher_client.errors import ServerError, ServerUnavailable, SessionNotFound, TaskGone

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
# The server holds a poll up to `wait` seconds; give it room to answer.
POLL_READ_MARGIN = 10.0
SESSION_NOT_FOUND = "session_not_found"   # the error code of a 404 for a forgotten session


class SwitchboardAPI:
    def __init__(self, server: str, token: str, connect_timeout=CONNECT_TIMEOUT,
                 read_timeout=READ_TIMEOUT):
        self.base = f"{server.rstrip('/')}/api/v1"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured (read once, below),
        # which is how publishers behind a proxy get out.
        self.http = requests.Session()
        # Poll, heartbeat, results and chunk posts of concurrent tasks share
        # the pool; the default of 10 would drop connections under load.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        self.http.headers.update({"Authorization": f"Bearer {token}",
                                  "User-Agent": f"switchboard-publisher/{__version__}"})
        read_environment_once(self.http, self.base)

    def register(self, session_id: str | None, llms: list[dict], agents: list[dict]) -> dict:
        """Publish LLMs and agents; returns {session_id, llms, agents}.
        Raises ServerError (403 when another token owns `session_id`, 409 on
        a name conflict) or ServerUnavailable."""
        payload = {"session_id": session_id, "llms": llms}
        if agents:
            payload["agents"] = agents
        try:
            return self._call("POST", "/publishers/register", json=payload, expect=201)
        except ServerError as exc:
            if exc.status == 404 and exc.code in (None, "not_found", "unsupported_endpoint"):
                # No such route: not our server, or not where `server` points.
                raise ServerError(
                    f"POST {self.base}/publishers/register: 404: no Switchboard there; check "
                    f"`server`: it must be Switchboard's base URL (e.g. http://127.0.0.1:8000), "
                    f"the one `make run` serves, without /api/v1", exc.status, exc.code) from None
            raise

    def heartbeat(self, session_id: str):
        """Raises SessionNotFound when the server has forgotten the session
        (any other 404 is ServerUnavailable)."""
        self._call("POST", f"/publishers/{session_id}/heartbeat", json={},
                   not_found=SessionNotFound)

    def poll(self, session_id: str, wait: float, ack: list[str] = ()) -> list[dict]:
        """Wait up to `wait` seconds for tasks, acknowledging the ids in `ack`
        (the tasks the last poll brought: the parameter is always sent, so the
        server redelivers a task whose poll answer was lost). Raises
        SessionNotFound."""
        reply = self._call("GET", f"/publishers/{session_id}/tasks",
                           params={"wait": wait, "ack": ",".join(ack)},
                           read_timeout=wait + POLL_READ_MARGIN, not_found=SessionNotFound)
        return reply.get("tasks") or []

    def post_result(self, task_id: str, outcome: dict):
        """`outcome` is {status, body} or {error}. Raises TaskGone (404, 410);
        409 (already completed) is a ServerError."""
        self._call("POST", f"/tasks/{task_id}/result", json=outcome, not_found=TaskGone)

    def post_chunks(self, task_id: str, chunks: list[str], seq: int, done: bool = False):
        """Post one batch of SSE payloads starting at stream index `seq`.
        Raises TaskGone when the client went away (410) or the task is unknown."""
        payload = {"chunks": [{"data": data} for data in chunks], "seq": seq}
        if done:
            payload["done"] = True
        self._call("POST", f"/tasks/{task_id}/chunks", json=payload, not_found=TaskGone)

    def post_session_chunks(self, session_id: str, entries: list[dict]) -> list[dict]:
        """Post the chunks of many streams of the session at once: `entries`
        are `{task_id, chunks: [{data}], seq, done?}`. Returns the server's
        per-entry results, in order: `{task_id, accepted: true}` or
        `{task_id, error: {status, code, message}}`. Raises SessionNotFound,
        ServerUnavailable (retry: the server deduplicates by seq) or ServerError."""
        reply = self._call("POST", f"/publishers/{session_id}/chunks", json={"tasks": entries},
                           not_found=SessionNotFound)
        return reply.get("results")

    def disconnect(self, session_id: str):
        """End the session: the server marks our rows inactive at once."""
        self._call("DELETE", f"/publishers/{session_id}", expect=204, not_found=SessionNotFound)

    def close(self):
        self.http.close()

    def _call(self, method, path, *, expect=200, read_timeout=None, not_found=ServerError,
              **kwargs):
        timeout = (self.connect_timeout, read_timeout or self.read_timeout)
        try:
            response = self.http.request(method, self.base + path, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise ServerUnavailable(f"{method} {path}: {_short(exc)}") from None
        if response.status_code == expect:
            try:
                return response.json() if response.content else {}
            except ValueError:
                # Typically a proxy's HTML page: worth retrying, not worth crashing on.
                raise ServerUnavailable(f"{method} {path}: {response.status_code} with a "
                                        "body that is not JSON", response.status_code) from None
        message, code = _error_of(response)
        text = f"{method} {path}: {response.status_code} {message}"
        status = response.status_code
        if status >= 500 or status == 429:  # 429: the server asks us to slow down, not stop
            raise ServerUnavailable(text, status, code)
        if status == 404:
            if not_found is SessionNotFound and code != SESSION_NOT_FOUND:
                # Not the server's word on our session: a proxy's page, a
                # route missing mid-deploy. Registering again would not help.
                raise ServerUnavailable(text, status, code)
            raise not_found(text, status, code)
        if status == 410:
            raise TaskGone(text, status, code)
        raise ServerError(text, status, code)


def _error_of(response) -> tuple[str, str | None]:
    """The message and code of the server's error envelope, or the raw text."""
    try:
        error = response.json()["error"]
        return str(error.get("message", "")), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        # One line: a proxy's or framework's HTML page would otherwise span many.
        text = " ".join(response.text[:200].split())
        return text or response.reason or "", None


def _short(exc: Exception) -> str:
    """requests' messages nest urllib3's; the innermost reason is the useful part."""
    reason = exc
    while reason.args and isinstance(reason.args[0], Exception):
        reason = reason.args[0]
    reason = getattr(reason, "reason", reason)
    return f"{type(exc).__name__}: {reason}"
