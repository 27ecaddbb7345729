"""Projects: admin writes, everyone reads."""
from flask import Blueprint

from blueprints.common import json_body, require
from extensions import db
from schemas.agent import project_create, project_update
from services import projects

bp = Blueprint("projects", __name__)


@bp.get("/projects")
def list_projects():
    return [project.view() for project in projects.list_projects(db.session)]


@bp.get("/projects/<name>")
def get_project(name):
    return projects.get_project(db.session, name).view()


@bp.post("/projects")
@require("admin")
def create_project():
    project = projects.create_project(db.session, json_body(project_create))
    db.session.commit()
    return project.view(), 201


@bp.patch("/projects/<name>")
@require("admin")
def update_project(name):
    project = projects.update_project(db.session, name, json_body(project_update))
    db.session.commit()
    return project.view()


@bp.delete("/projects/<name>")
@require("admin")
def delete_project(name):
    projects.delete_project(db.session, name)
    db.session.commit()
    return "", 204
