"""`GET /metrics` (admin) and `GET /api/v1/usage`."""
from datetime import timedelta

from flask import Blueprint, Response, current_app, request

from blueprints.common import authenticate_request, caller, require
from extensions import db
from models import utcnow
from schemas.usage import usage_query
from services import metrics, usage

bp = Blueprint("operations", __name__)
metrics_bp = Blueprint("metrics", __name__)
metrics_bp.before_request(authenticate_request)


@metrics_bp.get("/metrics")
@require()
def prometheus_metrics():
    db.session.close()  # the scrape reads files and the bus, not the database
    return Response(metrics.render(current_app.extensions["task_bus"]),
                    content_type=metrics.CONTENT_TYPE)


@bp.get("/usage")
def usage_view():
    query = usage_query.load(request.args)
    until = query.get("until") or utcnow()
    since = query.get("since") or until - timedelta(days=1)
    me = caller()
    return usage.summary(db.session, since, until, token=None if me.is_admin else me.id,
                         bucket_seconds=int(current_app.config["USAGE_BUCKET_SECONDS"]))
