"""Debian's headless Chromium, started by the test and driven over the
DevTools protocol by Playwright (`connect_over_cdp`: Playwright downloads no
browser of its own and starts nothing).

    with headless_chromium(tmp_path) as browser:
        page = browser.new_page()
        page.goto(url)

Chromium starts with a fresh profile and no background networking (this
machine reaches nothing outside, and the page must need nothing from outside).
"""
import contextlib
import re
import shutil
import subprocess
import tempfile
import threading
import time

from tests.support.system_tools import require_program

STARTUP_TIMEOUT = 30.0
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "--window-size=1400,1000")


def chromium_binary() -> str:
    return require_program("chromium", "chromium", "/usr/bin/chromium")


@contextlib.contextmanager
def headless_chromium(log_folder):
    """A Playwright Browser connected to a new headless Chromium; stopped after."""
    from playwright.sync_api import sync_playwright

    binary = chromium_binary()
    profile = tempfile.mkdtemp(prefix="switchboard-chromium-")
    log_path = log_folder / "chromium.log"
    process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    endpoint, lines = _devtools_endpoint(process)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.connect_over_cdp(endpoint, timeout=20_000)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log_path.write_text("\n".join(lines))
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_endpoint(process) -> tuple[str, list[str]]:
    """Chromium's `DevTools listening on ws://...` line; its stderr is read on
    (and kept) so that it never fills up."""
    lines, found = [], threading.Event()
    endpoint = []

    def read():
        for line in process.stderr:
            lines.append(line.rstrip())
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match and not found.is_set():
                endpoint.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            break
    if not endpoint:
        process.kill()
        raise RuntimeError("Chromium did not start its DevTools endpoint:\n" + "\n".join(lines))
    return endpoint[0], lines
