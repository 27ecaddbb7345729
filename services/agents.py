"""Agents: an LLM plus a persona (system prompt, default params, personalities).

CRUD for operators; publishers' virtual agents come in through
services/lifecycle.register. Services flush; views commit.
"""
import logging

import sqlalchemy as sa

from models import Agent, Kind, Llm, Status
from services import personalities, projects, registry, rows
from services.errors import Conflict, NotFound, Unavailable
from services.inference import POOL_PREFIX

log = logging.getLogger(__name__)


def list_agents(session) -> list[Agent]:
    return list(session.scalars(sa.select(Agent).order_by(Agent.name)))


def list_usable_agents(session, usable_llms) -> list[Agent]:
    """The agents on `usable_llms` (see registry.list_usable_llms), or on a
    pool one of them serves, that are not inactive themselves."""
    llm_ids = [llm.id for llm in usable_llms]
    models = sorted({llm.model for llm in usable_llms})
    if not llm_ids:
        return []
    return list(session.scalars(
        sa.select(Agent).where(Agent.status != Status.INACTIVE,
                               sa.or_(Agent.llm_id.in_(llm_ids), Agent.model.in_(models)))
        .order_by(Agent.name)))


def get_agent(session, name: str) -> Agent:
    """The agent called `name`. Raises NotFound."""
    return rows.get_by_name(session, Agent, name, "Agent")


def get_usable_agent(session, name: str) -> Agent:
    """The agent, if a chat can use it: a virtual agent whose publisher went
    away is not. Raises NotFound, Unavailable."""
    agent = get_agent(session, name)
    if agent.status == Status.INACTIVE:
        raise Unavailable(f"Virtual agent '{name}' is inactive; publisher offline",
                          code="publisher_offline")
    return agent


def create_agent(session, data: dict, owner: str) -> Agent:
    """Insert a public agent owned by the token `owner`. Raises NotFound (its
    LLM, project or default personality), Conflict (name taken)."""
    data = dict(data)
    agent = Agent(kind=Kind.PUBLIC, status=Status.ACTIVE, owner=owner)
    if session.scalar(sa.select(Agent.id).where(Agent.name == data["name"])):
        raise Conflict(f"Agent name '{data['name']}' is taken", code="name_taken")
    _apply(session, agent, data)
    session.add(agent)
    rows.flush_or_conflict(session, f"Agent name '{data['name']}' is taken")
    log.info("created agent %s on %s", agent.name, runs_on(agent))
    return agent


def update_agent(session, name: str, data: dict) -> Agent:
    """Apply a partial update (`null` clears project, default_personality,
    proxy_model_name). With `version`, the row must still be at that version.
    Raises NotFound, Conflict (version mismatch)."""
    agent = get_agent(session, name)
    data = dict(data)
    rows.check_version(agent, data.pop("version", None), "Agent")
    _apply(session, agent, data)
    rows.flush_versioned(session, agent, "Agent")
    return agent


def delete_agent(session, name: str) -> None:
    """Delete an agent with its personalities, own prompts and chat threads.
    Raises NotFound."""
    session.delete(get_agent(session, name))
    session.flush()
    log.info("deleted agent %s", name)


def persona(session, agent: Agent, personality: str | None = None) -> tuple[str, dict]:
    """The agent's system text (its system prompt, then the prompts of
    `personality`, else of its default personality) and its default params.
    Raises NotFound (personality)."""
    chosen = (personalities.get_personality(session, agent, personality)
              if personality else agent.default_personality)
    parts = [agent.system_prompt] + ([p.content for p in chosen.prompts] if chosen else [])
    return "\n\n".join(part for part in parts if part and part.strip()), dict(
        agent.default_params or {})


def through_agent(session, name: str, body: dict) -> tuple[str, dict]:
    """A stateless chat-completions call through agent `name`: where to run
    it (an LLM's name, or `pool:<model>`), and the body with the agent's
    system text first and its default params under the body's own. Raises
    NotFound, Unavailable."""
    agent = get_usable_agent(session, name)
    system, defaults = persona(session, agent)
    body = {**defaults, **{k: v for k, v in body.items() if k != "model"}}
    if system:
        body["messages"] = [{"role": "system", "content": system}, *body["messages"]]
    return runs_on(agent), body


def runs_on(agent: Agent) -> str:
    """Where the agent's calls run: its LLM's name, or `pool:<model>`."""
    return agent.llm.name if agent.llm is not None else POOL_PREFIX + agent.model


def _apply(session, agent, data):
    """Set the fields of `data`, resolving names to rows. An LLM replaces the
    agent's pool and a pool its LLM: it has one or the other."""
    if data.get("llm") is not None:
        agent.llm, agent.model = registry.get_llm(session, data.pop("llm")), None
    if data.get("model") is not None:
        model = data.pop("model")
        if not session.scalar(sa.select(sa.exists().where(Llm.model == model))):
            raise NotFound(f"No LLM serves model '{model}'", code="model_not_found")
        agent.llm, agent.model = None, model
    data.pop("llm", None)
    data.pop("model", None)
    if "project" in data:
        name = data.pop("project")
        agent.project = projects.get_project(session, name) if name else None
    if "default_personality" in data:
        name = data.pop("default_personality")
        if name and agent.id is None:
            raise NotFound(f"Personality '{name}' not found: a new agent has none yet",
                           code="personality_not_found")
        agent.default_personality = (
            personalities.get_personality(session, agent, name) if name else None)
    for key, value in data.items():
        setattr(agent, key, value)
