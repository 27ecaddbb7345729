"""OpenAI-compatible aliases, so `openai.OpenAI(base_url=".../v1")` works unchanged."""
import calendar

from flask import Blueprint

from blueprints.common import authenticate_request, require
from blueprints.infer import inference_body, run_inference
from extensions import db
from services import registry
from services.errors import Invalid

bp = Blueprint("openai_compat", __name__, url_prefix="/v1")
bp.before_request(authenticate_request)


@bp.get("/models")
def list_models():
    models = [{"id": llm.name, "object": "model",
               "created": calendar.timegm(llm.created_at.timetuple()),
               "owned_by": llm.kind}
              for llm in registry.list_usable_llms(db.session)]
    return {"object": "list", "data": models}


@bp.post("/chat/completions")
@require("client")
def chat_completions():
    body = inference_body()
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise Invalid("'model' must name an LLM", code="validation_failed",
                      details={"model": ["Missing data for required field."]})
    return run_inference(name, body)
