"""The server as gunicorn runs it (real processes): `make run` binds loopback
unless HOST is set, two instances keep a control socket each, and a HUP with
`--workers 4` on the in-memory bus starts one worker, not four."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.support.live import REPO_ROOT, free_port, run_flask, server_env, venv_bin

HAS_VENV = (REPO_ROOT / ".venv" / "bin" / ".installed").exists()


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def migrated_env(tmp_path, port, **extra):
    env = server_env(f"sqlite:///{tmp_path / f'db-{port}.db'}", port, extra)
    run_flask(env, "db", "upgrade")
    return env


class Process:
    """A command in a process group of its own, its output in a file."""

    def __init__(self, args, env, log_path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self):
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


@pytest.fixture
def processes():
    started = []
    yield lambda *args, **kwargs: started.append(Process(*args, **kwargs)) or started[-1]
    for process in started:
        process.stop()


def gunicorn(env, *args):
    return [str(venv_bin() / "gunicorn"), "-c", "gunicorn.conf.py", *args, "wsgi:app"]


# -- make run ------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_VENV, reason="needs the repository's venv (make .venv/bin/.installed)")
@pytest.mark.parametrize("host, listening", [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_make_run_binds_loopback_unless_host_is_set(tmp_path, processes, host, listening):
    port = free_port()
    env = server_env(f"sqlite:///{tmp_path / 'run.db'}", port)
    env.pop("HOST")
    if host:
        env["HOST"] = host
    run = processes(["make", "--no-print-directory", "run"], env, tmp_path / "make.log")
    wait_for(lambda: healthy(port), what="make run to serve")
    assert f"Listening at: http://{listening}:{port}" in run.log()
    assert "Admin token (shown once, keep it): sb_" in run.log()


def test_the_procfile_still_binds_every_interface():
    assert (REPO_ROOT / "Procfile").read_text() == (
        "web: gunicorn -c gunicorn.conf.py wsgi:app\nrelease: flask db upgrade\n")
    assert 'os.environ.get("HOST", "0.0.0.0")' in (REPO_ROOT / "gunicorn.conf.py").read_text()


# -- the control socket ----------------------------------------------------------------

def test_two_instances_keep_a_control_socket_each(tmp_path, processes):
    ports = [free_port(), free_port()]
    envs = [migrated_env(tmp_path, port) for port in ports]
    servers = [processes(gunicorn(env), env, tmp_path / f"server-{port}.log")
               for port, env in zip(ports, envs)]
    sockets = [REPO_ROOT / "instance" / f"gunicorn-{port}.ctl" for port in ports]
    for port, sock in zip(ports, sockets):
        wait_for(lambda: healthy(port) and sock.exists(), what=f"instance on {port}")
    for server, sock in zip(servers, sockets):  # each socket is its own instance's
        [worker] = wait_for(lambda: booted_pids(server.log()), what="a worker")
        shown = subprocess.run([str(venv_bin() / "gunicornc"), "-s", str(sock), "-c",
                                "show workers", "-j"], capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert str(worker) in shown.stdout
    servers[1].stop()
    assert not sockets[1].exists()
    assert sockets[0].exists()  # the first instance's socket survives the second's exit


# -- HUP with --workers 4 on the memory bus ------------------------------------------

def booted_pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log)]


def alive(pid) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def workers_of(master) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == master and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def test_a_hup_with_four_workers_on_the_memory_bus_starts_one_worker(tmp_path, processes):
    port = free_port()
    env = migrated_env(tmp_path, port, GUNICORN_CMD_ARGS="--graceful-timeout 2 --workers 4")
    server = processes(gunicorn(env, "--no-control-socket"), env, tmp_path / "server.log")
    wait_for(lambda: healthy(port), what="the server")
    [first] = wait_for(lambda: booted_pids(server.log()), what="the first worker")
    assert "running 1, not 4" in server.log()

    os.kill(server.popen.pid, signal.SIGHUP)
    wait_for(lambda: len(booted_pids(server.log())) >= 2 and not alive(first),
             what="the old worker to be replaced")
    assert len(booted_pids(server.log())) == 2  # one new worker, not four
    assert workers_of(server.popen.pid) == [booted_pids(server.log())[1]]
    assert healthy(port)
