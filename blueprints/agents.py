"""Agents and their personalities: admin writes, everyone reads."""
from flask import Blueprint

from blueprints.common import caller, json_body, require
from extensions import db
from schemas.agent import agent_create, agent_update, personality_create, personality_update
from services import agents, personalities

bp = Blueprint("agents", __name__)


@bp.get("/agents")
def list_agents():
    return [agent.view() for agent in agents.list_agents(db.session)]


@bp.get("/agents/<name>")
def get_agent(name):
    return agents.get_agent(db.session, name).view()


@bp.post("/agents")
@require("admin")
def create_agent():
    agent = agents.create_agent(db.session, json_body(agent_create), owner=caller().id)
    db.session.commit()
    return agent.view(), 201


@bp.patch("/agents/<name>")
@require("admin")
def update_agent(name):
    agent = agents.update_agent(db.session, name, json_body(agent_update))
    db.session.commit()
    return agent.view()


@bp.delete("/agents/<name>")
@require("admin")
def delete_agent(name):
    agents.delete_agent(db.session, name)
    db.session.commit()
    return "", 204


@bp.get("/agents/<name>/personalities")
def list_personalities(name):
    agent = agents.get_agent(db.session, name)
    return [p.view(name) for p in personalities.list_personalities(db.session, agent)]


@bp.get("/agents/<name>/personalities/<personality>")
def get_personality(name, personality):
    agent = agents.get_agent(db.session, name)
    return personalities.get_personality(db.session, agent, personality).view(name)


@bp.post("/agents/<name>/personalities")
@require("admin")
def create_personality(name):
    data = json_body(personality_create)
    agent = agents.get_agent(db.session, name)
    personality = personalities.create_personality(db.session, agent, data)
    db.session.commit()
    return personality.view(name), 201


@bp.patch("/agents/<name>/personalities/<personality>")
@require("admin")
def update_personality(name, personality):
    data = json_body(personality_update)
    agent = agents.get_agent(db.session, name)
    updated = personalities.update_personality(db.session, agent, personality, data)
    db.session.commit()
    return updated.view(name)


@bp.delete("/agents/<name>/personalities/<personality>")
@require("admin")
def delete_personality(name, personality):
    agent = agents.get_agent(db.session, name)
    personalities.delete_personality(db.session, agent, personality)
    db.session.commit()
    return "", 204
