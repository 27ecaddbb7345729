"""Real nginx running `deploy/nginx.conf` with only its ports and paths replaced.

    config = shipped_config(listen_port=free_port(), upstream_port=server.port, folder=folder)
    proxy = start_nginx(config, folder)
    requests.get(proxy.url + "/healthz")
    proxy.stop()

`folder` holds the pid file, the logs and the temp files. A test that needs a
variant (another timeout, say) passes `replace=[(old, new)]`, each of which
must match, so that the test notices when the shipped file changes under it.
"""
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.live import REPO_ROOT
from tests.support.system_tools import require_program

CONFIG = REPO_ROOT / "deploy" / "nginx.conf"
STARTUP_TIMEOUT = 10.0


def nginx_binary() -> str:
    return require_program("nginx", "nginx", "/usr/sbin/nginx")


def nginx_folder() -> Path:
    """A new folder for one nginx's pid, logs and temp files. When nginx runs as
    root its workers run as `nobody`, who must reach the temp folders: outside
    pytest's private tmp tree, and world-traversable."""
    folder = Path(tempfile.mkdtemp(prefix="switchboard-nginx-"))
    folder.chmod(0o755)
    return folder


def shipped_config(*, listen_port: int, upstream_port: int, folder: Path,
                   replace=()) -> str:
    text = CONFIG.read_text()
    substitutions = [
        ("listen 80;", f"listen 127.0.0.1:{listen_port};"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};"),
        ("/run/nginx.pid", f"{folder}/nginx.pid"),
        ("/var/log/nginx/", f"{folder}/"),
        ("/var/lib/nginx/", f"{folder}/"),
        *replace,
    ]
    for old, new in substitutions:
        if old not in text:
            raise AssertionError(f"deploy/nginx.conf no longer contains {old!r}: update "
                                 f"tests/support/nginx.py")
        text = text.replace(old, new)
    return text


@dataclass
class Nginx:
    port: int
    folder: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def check_config(path: Path, error_log: str | None = None) -> subprocess.CompletedProcess:
    """`nginx -t -c path` (its startup messages to `error_log` when given)."""
    cmd = [nginx_binary(), "-t", "-c", str(path)]
    if error_log:
        cmd += ["-e", error_log]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def start_nginx(config: str, folder: Path) -> Nginx:
    """Run nginx in the foreground on `config`; return once its port accepts."""
    path = folder / "nginx.conf"
    path.write_text(config)
    port = int(config.split("listen 127.0.0.1:", 1)[1].split(";", 1)[0])
    with open(folder / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [nginx_binary(), "-c", str(path), "-e", str(folder / "error.log"),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    proxy = Nginx(port=port, folder=folder, process=process)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n"
                               f"{(folder / 'stderr.log').read_text()}{proxy.error_log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proxy
        except OSError:
            time.sleep(0.05)
    proxy.stop()
    raise RuntimeError(f"nginx did not listen on {port} within {STARTUP_TIMEOUT:g} s:\n"
                       f"{proxy.error_log()}")


def is_root() -> bool:
    return os.geteuid() == 0
