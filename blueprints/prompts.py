"""Prompts in their three scopes, one set of views:

    /prompts[/<name>]                        global
    /projects/<owner>/prompts[/<name>]       a project's
    /agents/<owner>/prompts[/<name>]         an agent's

Admin writes, everyone reads.
"""
from flask import Blueprint

from blueprints.common import json_body, require
from extensions import db
from schemas.agent import prompt_create, prompt_update
from services import prompts

bp = Blueprint("prompts", __name__)

PREFIXES = {"global": "", "project": "/projects/<owner>", "agent": "/agents/<owner>"}


def _scope(kind, owner):
    if kind == "project":
        return prompts.project_scope(db.session, owner)
    if kind == "agent":
        return prompts.agent_scope(db.session, owner)
    return prompts.GLOBAL


def list_prompts(kind, owner=None):
    scope = _scope(kind, owner)
    return [p.view(scope.name) for p in prompts.list_prompts(db.session, scope)]


def get_prompt(kind, name, owner=None):
    scope = _scope(kind, owner)
    return prompts.get_prompt(db.session, scope, name).view(scope.name)


@require("admin")
def create_prompt(kind, owner=None):
    data = json_body(prompt_create)
    scope = _scope(kind, owner)
    prompt = prompts.create_prompt(db.session, scope, data)
    db.session.commit()
    return prompt.view(scope.name), 201


@require("admin")
def update_prompt(kind, name, owner=None):
    data = json_body(prompt_update)
    scope = _scope(kind, owner)
    prompt = prompts.update_prompt(db.session, scope, name, data)
    db.session.commit()
    return prompt.view(scope.name)


@require("admin")
def delete_prompt(kind, name, owner=None):
    prompts.delete_prompt(db.session, _scope(kind, owner), name)
    db.session.commit()
    return "", 204


for _kind, _prefix in PREFIXES.items():
    _defaults = {"kind": _kind}
    for _suffix, _view, _method in (("", list_prompts, "GET"), ("", create_prompt, "POST"),
                                    ("/<name>", get_prompt, "GET"),
                                    ("/<name>", update_prompt, "PATCH"),
                                    ("/<name>", delete_prompt, "DELETE")):
        bp.add_url_rule(f"{_prefix}/prompts{_suffix}", f"{_view.__name__}_{_kind}", _view,
                        methods=[_method], defaults=_defaults)
