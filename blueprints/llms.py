from flask import Blueprint

from blueprints.common import api_key_cipher, json_body, require
from extensions import db
from schemas.llm import llm_create, llm_update
from services import registry

bp = Blueprint("llms", __name__)


@bp.get("/llms")
def list_llms():
    return [llm.view() for llm in registry.list_llms(db.session)]


@bp.get("/llms/<name>")
def get_llm(name):
    return registry.get_llm(db.session, name).view()


@bp.post("/llms")
@require("admin")
def create_llm():
    llm = registry.create_llm(db.session, json_body(llm_create), api_key_cipher())
    db.session.commit()
    return llm.view(), 201


@bp.patch("/llms/<name>")
@require("admin")
def update_llm(name):
    llm = registry.update_llm(db.session, name, json_body(llm_update), api_key_cipher())
    db.session.commit()
    return llm.view()


@bp.delete("/llms/<name>")
@require("admin")
def delete_llm(name):
    registry.delete_llm(db.session, name)
    db.session.commit()
    return "", 204
