"""A real Switchboard: `flask db upgrade` on a new database of the test stack
(SQLite file, or PostgreSQL with Redis and two workers: tests/support/stack.py),
three tokens, then gunicorn with the gevent worker on a free loopback port.

    server = start_server(tmp_path, env={"SWITCHBOARD_TASK_PICKUP_TIMEOUT": "1"})
    requests.get(server.url + "/api/v1/llms", headers=server.headers("client"))
    server.flask("tokens", "revoke", "client")
    server.stop()

The tokens are named after their roles (`admin`, `publisher`, `client`).
"""
import os
import signal
import socket
import subprocess
import sys
import time
import http.client
from pathlib import Path

from tests.support import stack

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES = ("admin", "publisher", "client")
STARTUP_TIMEOUT = 15.0
# Several servers may run at once: no shared control socket in $HOME.
GUNICORN_ARGS = ("--no-control-socket",)
# An idle keep-alive connection holds a graceful stop for the whole graceful
# timeout; tests want it short (pass GUNICORN_CMD_ARGS in `env` to change it).
DEFAULT_GUNICORN_CMD_ARGS = "--graceful-timeout 2"
# Settings of the outer environment must not leak into a test server.
_SCRUBBED_PREFIXES = ("SWITCHBOARD_",)
_SCRUBBED = {"DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY", "HOST", "PORT", "ACCESS_LOG",
             "GUNICORN_CMD_ARGS", "FLASK_APP", "PROMETHEUS_MULTIPROC_DIR",
             "_SWITCHBOARD_OWN_METRICS_DIR"}


def venv_bin() -> Path:
    """The bin directory holding `flask` and `gunicorn`: the repo's venv, else ours."""
    repo_venv = REPO_ROOT / ".venv" / "bin"
    return repo_venv if (repo_venv / "flask").exists() else Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CommandError(subprocess.CalledProcessError):
    def __str__(self):
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


class ServerStartError(RuntimeError):
    pass


class LiveServer:
    def __init__(self, *, port, db_url, tokens, env, process, log_path, bus_settings,
                 owns_database=True):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.db_url = db_url
        self.tokens = tokens
        self.env = env
        self.process = process
        self.log_path = log_path
        self.bus_settings = bus_settings
        self.redis_prefix = bus_settings.get("REDIS_PREFIX")
        self.owns_database = owns_database

    def headers(self, role: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def flask(self, *args, check=True) -> subprocess.CompletedProcess:
        """Run `flask ARGS...` against this server's database."""
        return run_flask(self.env, *args, check=check)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (gunicorn's graceful stop), then SIGKILL of its process group."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def restart(self) -> None:
        """Stop gunicorn gracefully and start it again on the same port,
        database and bus (what a deploy does); return once `/healthz` answers."""
        self.stop()
        with open(self.log_path, "ab") as log:
            self.process = _spawn_gunicorn(self.env, log)
        _wait_healthy(self)

    def clean_up(self) -> dict:
        """Once stopped: drop its database and its Redis keys. Returns {key: ttl}
        of the keys that had no TTL (there must be none)."""
        if self.owns_database:
            stack.drop_database(self.db_url)
        if self.redis_prefix is None:
            return {}
        left = {key: ttl for key, ttl in stack.redis_keys(self.redis_prefix).items() if ttl == -1}
        stack.delete_redis_keys(self.redis_prefix)
        return left

    def __repr__(self):
        return f"LiveServer({self.url})"


def run_flask(env: dict, *args, check=True) -> subprocess.CompletedProcess:
    cmd = [str(venv_bin() / "flask"), *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    if check and result.returncode != 0:
        raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
    return result


def server_env(db_url: str, port: int, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
    env.update({"FLASK_APP": "wsgi", "DATABASE_URL": db_url, "HOST": "127.0.0.1",
                "PORT": str(port), "PYTHONUNBUFFERED": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "GUNICORN_CMD_ARGS": DEFAULT_GUNICORN_CMD_ARGS})
    for key, value in (extra or {}).items():  # None unsets
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def create_tokens(env: dict) -> dict:
    """One token per role, named after it; the three commands run at once."""
    cmd = str(venv_bin() / "flask")
    procs = {role: subprocess.Popen([cmd, "tokens", "create", role, "--role", role],
                                    cwd=REPO_ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for role in ROLES}
    tokens = {}
    for role, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise CommandError(proc.returncode, proc.args, out, err)
        tokens[role] = out.strip()
    return tokens


def start_server(tmp_path, env=None, *, share_with: LiveServer | None = None,
                 db: str | None = None, bus: str | None = None) -> LiveServer:
    """Migrate a new database, create the tokens and start gunicorn; return
    once `/healthz` answers. With `share_with`, the new server uses that
    server's database, bus and tokens instead, as a second host would. `db`
    and `bus` choose a stack other than the test run's (benchmarks).
    Raises ServerStartError with the log's tail."""
    tmp_path = Path(tmp_path)
    port = free_port()
    if share_with is None:
        db_url, bus_settings = stack.empty_database(tmp_path, db), stack.bus_settings(bus)
    else:
        db_url, bus_settings = share_with.db_url, share_with.bus_settings
    full_env = server_env(db_url, port, {**stack.bus_environment(bus_settings), **(env or {})})
    if share_with is None:
        run_flask(full_env, "db", "upgrade")
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = _spawn_gunicorn(full_env, log)
    server = LiveServer(port=port, db_url=db_url, tokens={}, env=full_env, process=process,
                        log_path=log_path, bus_settings=bus_settings,
                        owns_database=share_with is None)
    try:
        if share_with is None:
            server.tokens.update(create_tokens(full_env))  # while gunicorn boots
        else:
            server.tokens.update(share_with.tokens)
        _wait_healthy(server)
    except BaseException:
        server.stop(timeout=2.0)
        raise
    return server


def _spawn_gunicorn(env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [str(venv_bin() / "gunicorn"), "-c", "gunicorn.conf.py", *GUNICORN_ARGS, "wsgi:app"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: stop() can kill the worker too


def _wait_healthy(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(f"gunicorn exited with {server.process.returncode}:\n"
                                   f"{_tail(server.log_text())}")
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    raise ServerStartError(f"{server.url}/healthz did not answer within {STARTUP_TIMEOUT:g} s:\n"
                           f"{_tail(server.log_text())}")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
