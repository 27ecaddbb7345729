"""OpenAI-compatible aliases, so `openai.OpenAI(base_url=".../v1")` works
unchanged, and Anthropic's messages, so does `anthropic.Anthropic(base_url=...)`.

`model: "agent:<name>"` runs a stateless chat call through an agent: its
system text first, its default params under the body's own fields. Any other
path under /v1 is a 404 envelope naming these routes (blueprints/errors.py).
"""
import calendar
import contextlib

from flask import Blueprint, current_app, request

from blueprints.common import authenticate_request, require
from blueprints.infer import inference_body, run_inference
from extensions import db
from models import Status
from services import agents, registry
from services.inference import ENDPOINT, POOL_PREFIX
from services.errors import Invalid, NotFound

AGENT_PREFIX = "agent:"
MODELS_HINT = "GET /v1/models lists the models you can use"

bp = Blueprint("openai_compat", __name__, url_prefix="/v1")
bp.before_request(authenticate_request)


def is_live(session_id: str) -> bool:
    return current_app.extensions["task_bus"].is_live(session_id)


@bp.get("/models")
def list_models():
    llms = registry.list_usable_llms(db.session, is_live)
    models = [_model(llm.name, llm) for llm in llms]
    models += [_pool(model, members) for model, members in registry.pools(llms).items()]
    models += [_model(AGENT_PREFIX + agent.name, agent)
               for agent in agents.list_usable_agents(db.session, llms)]
    return {"object": "list", "data": models}


@bp.get("/models/<path:model>")
def get_model(model):
    if model.startswith(AGENT_PREFIX):
        with models_hint():
            agent = agents.get_agent(db.session, model[len(AGENT_PREFIX):])
        usable = (registry.pool_is_usable(db.session, agent.model, is_live) if agent.llm is None
                  else registry.is_usable(agent.llm, is_live))
        if agent.status != Status.INACTIVE and usable:
            return _model(model, agent)
    elif model.startswith(POOL_PREFIX):
        members = registry.pools(registry.list_usable_llms(db.session, is_live)).get(
            model[len(POOL_PREFIX):])
        if members:
            return _pool(model[len(POOL_PREFIX):], members)
        with models_hint():
            registry.get_pool_model(db.session, model[len(POOL_PREFIX):])
    else:
        with models_hint():
            llm = registry.get_llm(db.session, model)
        if registry.is_usable(llm, is_live):
            return _model(model, llm)
    raise NotFound(f"Model '{model}' cannot answer now (its publisher is offline); "
                   f"{MODELS_HINT}", code="model_unavailable")


@bp.post("/chat/completions")
@require("client")
def chat_completions():
    body = inference_body()
    name = body.get("model")
    if not isinstance(name, str) or not name:
        reason = "Not a valid string." if "model" in body else "Missing data for required field."
        raise Invalid(f"model: {reason}", code="validation_failed", details={"model": [reason]})
    with models_hint():
        if name.startswith(AGENT_PREFIX):
            name, body = agents.through_agent(db.session, name[len(AGENT_PREFIX):], body)
        return run_inference(name, body)


@bp.post("/completions")
@require("client")
def completions():
    return _relayed("completions")


@bp.post("/embeddings")
@require("client")
def embeddings():
    return _relayed("embeddings")


@bp.post("/responses")
@require("client")
def responses():
    return _relayed("responses")


# Anthropic's request headers that a public upstream needs to see.
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


@bp.post("/messages")
@require("client")
def messages():
    """Anthropic's messages (its token may come as `x-api-key`, and our errors
    here use its envelope: blueprints/common.py, blueprints/errors.py)."""
    headers = {name: request.headers[name] for name in ANTHROPIC_HEADERS
               if name in request.headers}
    return _relayed("messages", headers)


def _relayed(path: str, headers=None):
    """The body checked where we know its fields, then relayed as it is but
    for `model`; the backend's status and body come back as they are."""
    endpoint = ENDPOINT[path]
    body = inference_body(endpoint)
    with models_hint():
        return run_inference(body["model"], body, endpoint, headers)


def _model(model_id, row) -> dict:
    return {"id": model_id, "object": "model",
            "created": calendar.timegm(row.created_at.timetuple()), "owned_by": row.kind}


def _pool(model, members) -> dict:
    return {"id": POOL_PREFIX + model, "object": "model",
            "created": min(calendar.timegm(m.created_at.timetuple()) for m in members),
            "owned_by": "pool"}


@contextlib.contextmanager
def models_hint():
    """A 404 for an unknown LLM or agent points at /v1/models."""
    try:
        yield
    except NotFound as exc:
        if exc.code not in ("llm_not_found", "agent_not_found", "model_not_found"):
            raise
        raise NotFound(f"{exc.message}; {MODELS_HINT}", code=exc.code) from None
