"""`GET /api/v1/openapi.json` (open): the OpenAPI document (schemas/openapi.py),
built once per app from its URL map."""
from flask import Blueprint, current_app

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")
VERSION = "1"


@bp.get("/openapi.json")
def openapi_document():
    extensions = current_app.extensions
    if "openapi" not in extensions:
        # Here, not at the top: apispec is for this document alone, and a
        # `flask` command starts without it.
        from schemas.openapi import build_document

        extensions["openapi"] = build_document(current_app.url_map, VERSION)
    return extensions["openapi"]
