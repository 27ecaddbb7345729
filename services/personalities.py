"""Personalities: named, ordered bundles of prompts, per agent. Services flush;
views commit."""
import logging

import sqlalchemy as sa

from models import Agent, Personality, PersonalityPrompt
from services.errors import Invalid, NotFound
from services.rows import flush_or_conflict
from services.prompts import resolve_for_agent

log = logging.getLogger(__name__)


def list_personalities(session, agent: Agent) -> list[Personality]:
    return list(session.scalars(
        sa.select(Personality).where(Personality.agent_id == agent.id)
        .order_by(Personality.name)))


def get_personality(session, agent: Agent, name: str) -> Personality:
    """The agent's personality called `name`. Raises NotFound."""
    personality = session.scalar(sa.select(Personality).where(
        Personality.agent_id == agent.id, Personality.name == name))
    if personality is None:
        raise NotFound(f"Personality '{name}' not found for agent '{agent.name}'",
                       code="personality_not_found")
    return personality


def create_personality(session, agent: Agent, data: dict) -> Personality:
    """Insert a personality with its prompts in order (see
    prompts.resolve_for_agent). Raises Conflict (name taken for this agent),
    NotFound (a prompt), Invalid (a prompt listed twice)."""
    data = dict(data)
    prompts = _resolve(session, agent, data.pop("prompts"))
    personality = Personality(agent_id=agent.id, **data)
    session.add(personality)
    flush_or_conflict(session, f"Personality name '{data['name']}' is taken for agent "
                               f"'{agent.name}'")
    _set_prompts(session, personality, prompts)
    log.info("created personality %s of agent %s", personality.name, agent.name)
    return personality


def update_personality(session, agent: Agent, name: str, data: dict) -> Personality:
    """Apply a partial update; `prompts` replaces the whole ordered list.
    Raises NotFound, Invalid like create_personality."""
    personality = get_personality(session, agent, name)
    data = dict(data)
    if "prompts" in data:
        _set_prompts(session, personality, _resolve(session, agent, data.pop("prompts")))
    for key, value in data.items():
        setattr(personality, key, value)
    session.flush()
    return personality


def delete_personality(session, agent: Agent, name: str) -> None:
    """Delete a personality; an agent whose default it was has no default
    afterwards. Raises NotFound."""
    session.delete(get_personality(session, agent, name))
    session.flush()
    session.expire(agent, ["default_personality_id", "default_personality"])
    log.info("deleted personality %s of agent %s", name, agent.name)


def _resolve(session, agent, names):
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise Invalid(f"Prompt(s) listed more than once: {', '.join(twice)}",
                      code="validation_failed", details={"prompts": ["Listed more than once."]})
    return resolve_for_agent(session, agent, names)


def _set_prompts(session, personality, prompts):
    # Delete, then insert: the unit of work would insert before deleting, and
    # a prompt kept in the list would collide with its own old link.
    session.execute(sa.delete(PersonalityPrompt)
                    .where(PersonalityPrompt.personality_id == personality.id))
    for position, prompt in enumerate(prompts):
        session.add(PersonalityPrompt(personality_id=personality.id, prompt_id=prompt.id,
                                      position=position))
    session.flush()
    session.expire(personality, ["links"])
