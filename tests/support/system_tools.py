"""System programs some tests drive (nginx, Chromium), and what to do when one is missing.

`.ci/run` installs them (Debian's `nginx` and `chromium`) before `make test`,
so under CI a missing one fails the test; on a developer's machine it skips
with a reason saying how to get it.
"""
import os
import shutil

import pytest


def require_program(name: str, package: str, *candidates: str) -> str:
    """The path of program `name` (on PATH or at one of `candidates`); when
    there is none, fail the test under CI (`CI` set) and skip it elsewhere."""
    path = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if path:
        return path
    reason = (f"{name} is not installed (Debian: apt-get install {package}; "
              f".ci/run installs it)")
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run this test", pytrace=False)
    pytest.skip(reason)
