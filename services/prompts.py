"""Prompts: global, per project or per agent, a name unique within its scope.

Personalities list prompts by name; a name resolves to the nearest scope
that has it: the agent's own prompts, then its project's, then the global ones.
"""
import logging
from dataclasses import dataclass

import sqlalchemy as sa

from models import Agent, Prompt
from services.errors import NotFound
from services.projects import get_project
from services.rows import flush_or_conflict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scope:
    """Where prompts live: nowhere in particular (global), a project or an agent."""

    project_id: str | None = None
    agent_id: str | None = None
    name: str | None = None  # the project's or agent's name

    @property
    def label(self) -> str:
        if self.agent_id:
            return f"agent '{self.name}'"
        return f"project '{self.name}'" if self.project_id else "global scope"

    def where(self):
        return sa.and_(_is(Prompt.project_id, self.project_id),
                       _is(Prompt.agent_id, self.agent_id))


GLOBAL = Scope()


def project_scope(session, project_name: str) -> Scope:
    """Raises NotFound."""
    return Scope(project_id=get_project(session, project_name).id, name=project_name)


def agent_scope(session, agent_name: str) -> Scope:
    """Raises NotFound."""
    agent_id = session.scalar(sa.select(Agent.id).where(Agent.name == agent_name))
    if agent_id is None:
        raise NotFound(f"Agent '{agent_name}' not found", code="agent_not_found")
    return Scope(agent_id=agent_id, name=agent_name)


def list_prompts(session, scope: Scope) -> list[Prompt]:
    return list(session.scalars(sa.select(Prompt).where(scope.where()).order_by(Prompt.name)))


def get_prompt(session, scope: Scope, name: str) -> Prompt:
    """The prompt called `name` in `scope`. Raises NotFound."""
    prompt = session.scalar(sa.select(Prompt).where(scope.where(), Prompt.name == name))
    if prompt is None:
        raise NotFound(f"Prompt '{name}' not found in {scope.label}", code="prompt_not_found")
    return prompt


def create_prompt(session, scope: Scope, data: dict) -> Prompt:
    """Insert a prompt in `scope`. Raises Conflict when the name is taken there."""
    prompt = Prompt(project_id=scope.project_id, agent_id=scope.agent_id, **data)
    session.add(prompt)
    flush_or_conflict(session, f"Prompt name '{data['name']}' is taken in {scope.label}")
    log.info("created prompt %s in %s", prompt.name, scope.label)
    return prompt


def update_prompt(session, scope: Scope, name: str, data: dict) -> Prompt:
    """Apply a partial update. Raises NotFound."""
    prompt = get_prompt(session, scope, name)
    for key, value in data.items():
        setattr(prompt, key, value)
    session.flush()
    return prompt


def delete_prompt(session, scope: Scope, name: str) -> None:
    """Delete a prompt; it leaves every personality that listed it. Raises NotFound."""
    session.delete(get_prompt(session, scope, name))
    session.flush()
    log.info("deleted prompt %s from %s", name, scope.label)


def resolve_for_agent(session, agent: Agent, names: list[str]) -> list[Prompt]:
    """The prompts `names` as the agent sees them, in order: each name from the
    agent's own prompts, else its project's, else the global ones. Raises
    NotFound naming every unknown prompt."""
    visible = [Prompt.agent_id == agent.id, GLOBAL.where()]
    if agent.project_id:
        visible.append(Prompt.project_id == agent.project_id)
    rows = session.scalars(sa.select(Prompt).where(Prompt.name.in_(set(names)), sa.or_(*visible)))
    nearest = {}
    for prompt in rows:
        rank = {"agent": 0, "project": 1, "global": 2}[prompt.scope]
        if prompt.name not in nearest or rank < nearest[prompt.name][0]:
            nearest[prompt.name] = (rank, prompt)
    missing = [name for name in names if name not in nearest]
    if missing:
        raise NotFound(f"Prompt(s) not found for agent '{agent.name}': {', '.join(missing)}",
                       code="prompt_not_found", details={"prompts": missing})
    return [nearest[name][1] for name in names]


def _is(column, value):
    return column.is_(None) if value is None else column == value
