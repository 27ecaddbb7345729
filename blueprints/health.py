"""`/healthz` (is the process up) and `/readyz` (can it serve: database and bus)."""
from flask import Blueprint, current_app

from extensions import db
from services.health import readiness

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"ok": True}


@bp.get("/readyz")
def readyz():
    checks = readiness(db.session, current_app.extensions["task_bus"])
    ready = all(value == "ok" for value in checks.values())
    return {"status": "ok" if ready else "fail", "checks": checks}, 200 if ready else 503
