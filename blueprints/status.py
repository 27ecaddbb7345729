"""`/status`: a server-rendered page for operators, behind a login form that
takes an admin token (DESIGN.md, "Operations"). The signed-in state is Flask's
session cookie (signed with SECRET_KEY; HttpOnly, SameSite=Strict, path
/status: settings.py); it holds the token's id, never the token. Nothing on
the page loads from elsewhere (its Content-Security-Policy says so).

Every error answer of the server (5xx, 413, 429) is also recorded here for the
page's "recent errors" (services/recent_errors.py).
"""
import logging

import orjson
from flask import (Blueprint, current_app, redirect, render_template, request, session,
                   url_for)
from flask.sessions import SecureCookieSessionInterface
from marshmallow import ValidationError

from extensions import db
from models import iso, utcnow
from schemas.status import login_form
from services import recent_errors, request_ids, status
from services.errors import ServiceError

bp = Blueprint("status", __name__)
log = logging.getLogger(__name__)

REFRESH_SECONDS = 10
RECORDED_STATUSES = (413, 429)  # and every 5xx
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class StatusSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, which builds its signer and reads its
    settings at every request (~25 µs): only the status page's requests pay
    for that now, not every API call."""

    def open_session(self, app, request):
        if self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app, session, response):
        if session.accessed:  # a change is an access too
            super().save_session(app, session, response)


def _page(template, status_code=200, **context):
    return render_template(template, **context), status_code, HEADERS


@bp.get("/status")
def status_page():
    admin = status.admin_by_id(db.session, session.get("token_id"))
    if admin is None:
        session.clear()
        return redirect(url_for("status.login_page"), 303)
    overview = status.overview(
        db.session, current_app.extensions["task_bus"], current_app.extensions["recent_errors"],
        utcnow(), bucket_seconds=int(current_app.config["USAGE_BUCKET_SECONDS"]))
    db.session.commit()
    return _page("status.html", overview=overview, admin=admin, refresh=REFRESH_SECONDS)


@bp.get("/status/login")
def login_page():
    return _page("login.html")


@bp.post("/status/login")
def login():
    try:
        form = login_form.load(request.form.to_dict())
    except ValidationError:
        return _page("login.html", 400, error="Paste an admin token.")
    try:
        admin = status.login(db.session, form["token"], utcnow())
    except ServiceError as exc:
        db.session.rollback()
        message = ("That token may not open this page: it is not an admin token."
                   if exc.status == 403 else "That token is not valid.")
        return _page("login.html", exc.status, error=message)
    db.session.commit()
    session.clear()
    session.permanent = True
    session["token_id"] = admin.id
    log.info("status page: %s signed in", admin.name)
    return redirect(url_for("status.status_page"), 303)


@bp.post("/status/logout")
def logout():
    session.clear()
    return redirect(url_for("status.login_page"), 303)


def record_error_answer(response):
    """App-level `after_request`: keep the server's error answers for the page.
    Not a publisher held back (its 429s are flow control), not the health
    checks, and not the bus's own absence (recording would wait on it too)."""
    code = response.status_code
    if code < 500 and code not in RECORDED_STATUSES:
        return response
    if request.blueprint == "health" or (code == 429 and request.blueprint == "api.publishers"):
        return response
    error = {}
    if response.mimetype == "application/json":  # our envelope: small, even when streamed
        try:
            error = orjson.loads(response.get_data()).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            error = {}
    if not isinstance(error, dict):
        error = {}
    if error.get("code") == "bus_unavailable":
        return response
    current_app.extensions["recent_errors"].record(recent_errors.entry(
        at=iso(utcnow()), status=code, code=error.get("code"), message=error.get("message"),
        method=request.method, path=request.path, request_id=request_ids.current()))
    return response
