from flask import Blueprint, Response, current_app, request
from marshmallow import ValidationError

from blueprints import instrumentation
from blueprints.common import caller, json_body, peer_connected, require
from extensions import db, relay
from jsonio import dumps
from schemas.inference import BODY_SCHEMAS
from services import database, inference
from services.inference import CHAT, Endpoint

bp = Blueprint("infer", __name__)


@bp.post("/llms/<name>/infer")
@require("client")
def infer(name):
    return run_inference(name, inference_body())


def inference_body(endpoint: Endpoint = CHAT) -> dict:
    """The endpoint's body (chat completions unless said), checked where we
    know its fields; the original dict (not the loaded one) goes on, so
    unknown fields pass untouched."""
    body = json_body()
    errors = BODY_SCHEMAS[endpoint.path].validate(body)
    if errors:
        raise ValidationError(errors)
    return body


@bp.post("/pools/<path:model>/infer")
@require("client")
def infer_on_pool(model):
    return run_inference(inference.POOL_PREFIX + model, inference_body())


def run_inference(name: str, body: dict, endpoint: Endpoint = CHAT, headers=None) -> Response:
    """Run `body` for `endpoint` on an LLM or, for `pool:<model>`, on a member
    of the pool; `headers` go on to a public upstream."""
    def run(route):
        return instrumentation.observed(relay()).infer(
            route, body, client_connected=peer_connected(request.environ), token=caller().id,
            endpoint=endpoint, headers=headers)

    return to_response(current_app.extensions["routes"].run(
        name, endpoint.path, lambda: read_route(name, endpoint.path), run))


def read_route(name: str, endpoint: str) -> inference.Route:
    database.reads_alone(db.session())
    route = inference.route(db.session, name, current_app.extensions["task_bus"].is_live,
                            endpoint)
    db.session.close()  # hold no pooled connection while the relay waits
    return route


def to_response(reply: inference.Reply) -> Response:
    if reply.stream is not None:
        return Response(reply.stream, status=reply.status, content_type=reply.content_type,
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    body = reply.body if isinstance(reply.body, bytes) else dumps(reply.body)
    return Response(body, status=reply.status, content_type=reply.content_type)
