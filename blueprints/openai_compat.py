"""OpenAI-compatible aliases, so `openai.OpenAI(base_url=".../v1")` works unchanged.

`model: "agent:<name>"` runs a stateless call through an agent: its system
text first, its default params under the body's own fields.
"""
import calendar

from flask import Blueprint

from blueprints.common import authenticate_request, require
from blueprints.infer import inference_body, run_inference
from extensions import db
from services import agents, registry
from services.errors import Invalid

AGENT_PREFIX = "agent:"

bp = Blueprint("openai_compat", __name__, url_prefix="/v1")
bp.before_request(authenticate_request)


@bp.get("/models")
def list_models():
    models = [{"id": llm.name, "object": "model",
               "created": calendar.timegm(llm.created_at.timetuple()),
               "owned_by": llm.kind}
              for llm in registry.list_usable_llms(db.session)]
    models += [{"id": AGENT_PREFIX + agent.name, "object": "model",
                "created": calendar.timegm(agent.created_at.timetuple()),
                "owned_by": agent.kind}
               for agent in agents.list_usable_agents(db.session)]
    return {"object": "list", "data": models}


@bp.post("/chat/completions")
@require("client")
def chat_completions():
    body = inference_body()
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise Invalid("'model' must name an LLM", code="validation_failed",
                      details={"model": ["Missing data for required field."]})
    if name.startswith(AGENT_PREFIX):
        name, body = agents.through_agent(db.session, name[len(AGENT_PREFIX):], body)
    return run_inference(name, body)
