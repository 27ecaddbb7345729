"""The sticky session id, kept across restarts so our rows stay ours."""
import json
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def load_session_id(path: Path, server: str) -> str | None:
    """The id saved for `server`, or None (no file, another server's id, or
    a damaged file, which is logged and will be overwritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable session file %s (%s); a new session will replace it",
                    path, exc)
        return None
    session_id = data.get("session_id") if isinstance(data, dict) else None
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        log.warning("ignoring damaged session file %s; a new session will replace it", path)
        return None
    if data.get("server") not in (None, server):
        log.info("session file %s belongs to %s; starting a new session", path, data["server"])
        return None
    return session_id


def save_session_id(path: Path, server: str, session_id: str):
    """Write the id atomically, readable by its owner only (0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp: a fresh, unpredictable name opened O_EXCL, mode 0600; nothing
    # planted in the directory (a symlink) can redirect the write.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"server": server, "session_id": session_id}, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
