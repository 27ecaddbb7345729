"""Wake recipes: start a sleeping backend, then wait until it answers.

`http` fires one request at a wake controller (any 2xx is success);
`command` runs a program (exit 0 is success). Either way the backend's
availability is then polled until the recipe's `max_wait_seconds`.
"""
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time

import requests

from publisher_client.config import WakeRecipe
from publisher_client.errors import WakeError

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0     # a wake controller should answer quickly (202 if the boot is long)
POLL_INTERVAL = 0.5


def run_recipe(recipe: WakeRecipe, max_seconds: float):
    """Run the recipe's request or command, for at most `max_seconds`.
    Raises WakeError on a non-2xx answer, a non-zero exit, or a timeout."""
    if recipe.type == "http":
        _run_http(recipe, recipe.timeout_seconds or min(HTTP_TIMEOUT, max_seconds))
    else:
        _run_command(recipe, min(recipe.timeout_seconds or max_seconds, max_seconds))


def _run_http(recipe, timeout):
    # The messages go to the server and on to clients: never the URL (it may
    # carry a token), which only the local log sees, in `detail`.
    try:
        response = requests.request(recipe.method, recipe.url, headers=recipe.headers,
                                    data=recipe.body, timeout=(min(5.0, timeout), timeout))
    except requests.Timeout:
        raise WakeError("wake request timed out", f"wake request to {recipe.url} timed out "
                        f"after {timeout:g} s") from None
    except requests.RequestException as exc:
        raise WakeError("wake request failed",
                        f"wake request to {recipe.url} failed: {exc}") from None
    if not 200 <= response.status_code < 300:
        raise WakeError(f"wake request failed with status {response.status_code}",
                        f"wake request to {recipe.url} answered {response.status_code}")


def _run_command(recipe, timeout):
    argv = [recipe.command, *recipe.args]
    # stderr goes to a file, not a pipe: a recipe that starts a server in the
    # background leaves it holding the descriptor, and a pipe would never close.
    with tempfile.TemporaryFile() as stderr:
        try:
            # A new session: Ctrl-C on the publisher must not kill the backend it
            # started. It also makes the command a process group of its own.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr, start_new_session=True)
        except OSError as exc:
            raise WakeError("wake command could not start", f"wake command {recipe.command} "
                            f"could not start: {exc.strerror or exc}") from None
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise WakeError("wake command timed out", f"wake command {recipe.command} did not "
                            f"finish within {timeout:g} s") from None
        if returncode != 0:
            stderr.seek(0)
            lines = stderr.read().decode("utf-8", "replace").strip().splitlines()
            tail = f": {lines[-1][:200]}" if lines else ""
            raise WakeError(f"wake command exited {returncode}", f"wake command "
                            f"{recipe.command} exited with code {returncode}{tail}")


def _kill_group(process):
    """Kill the command and whatever it started (its process group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group already ended
        pass
    process.wait()


class Waker:
    """Wakes one LLM's backend. Concurrent callers share the work: the
    lock makes the second caller find the backend already up."""

    def __init__(self, name, backend, recipe: WakeRecipe, on_tick=lambda: None,
                 interval=POLL_INTERVAL, clock=time.monotonic, sleep=time.sleep):
        self.name = name
        self.backend = backend
        self.recipe = recipe
        self.on_tick = on_tick
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()

    def wake(self) -> int:
        """Make the backend available; returns the milliseconds it took.
        Raises WakeError when the recipe fails or the backend does not come
        up within max_wait_seconds."""
        with self._lock:
            started = self.clock()
            if self.backend.available():
                return 0
            max_wait = self.recipe.max_wait_seconds
            log.info("waking LLM %s (%s recipe, up to %g s)", self.name, self.recipe.type, max_wait)
            run_recipe(self.recipe, max_wait)
            while not self.backend.available():
                if self.clock() - started >= max_wait:
                    raise WakeError(f"LLM '{self.name}' did not come up within {max_wait:g} s")
                self.on_tick()
                self.sleep(self.interval)
            ms = int((self.clock() - started) * 1000)
            log.info("LLM %s is awake after %d ms", self.name, ms)
            return ms
