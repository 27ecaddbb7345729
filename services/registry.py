"""The registry of LLMs: CRUD for operators. Services flush; views commit."""
import logging

import sqlalchemy as sa

from models import Agent, Kind, Llm, Status
from services import routes, rows
from services.errors import Conflict, NotFound

log = logging.getLogger(__name__)


def list_llms(session) -> list[Llm]:
    return list(session.scalars(sa.select(Llm).order_by(Llm.name)))


def list_usable_llms(session, is_live) -> list[Llm]:
    """LLMs that can answer now (see `is_usable`), by name."""
    rows = session.scalars(
        sa.select(Llm).where(Llm.status != Status.INACTIVE).order_by(Llm.name))
    live = {}  # one look-up per session, however many LLMs it publishes

    def cached_is_live(session_id):
        if session_id not in live:
            live[session_id] = is_live(session_id)
        return live[session_id]
    return [llm for llm in rows if is_usable(llm, cached_is_live)]


def is_usable(llm: Llm, is_live) -> bool:
    """Whether the LLM can answer now (DESIGN.md: "public rows, and virtual
    rows that are active with a live session or hibernating"): a hibernating
    row is woken first, and gc-sweep retires one whose publisher is gone."""
    if llm.status == Status.INACTIVE:
        return False
    if llm.kind != Kind.VIRTUAL or llm.status == Status.HIBERNATING:
        return True
    return bool(llm.provider_session_id) and is_live(llm.provider_session_id)


def pools(usable_llms: list[Llm]) -> dict[str, list[Llm]]:
    """{model: its usable rows}: the pools (`pool:<model>`) that can answer now."""
    by_model: dict[str, list[Llm]] = {}
    for llm in usable_llms:
        by_model.setdefault(llm.model, []).append(llm)
    return dict(sorted(by_model.items()))


def pool_is_usable(session, model: str, is_live) -> bool:
    rows = session.scalars(sa.select(Llm).where(Llm.model == model,
                                                Llm.status != Status.INACTIVE))
    return any(is_usable(llm, is_live) for llm in rows)


def get_pool_model(session, model: str) -> None:
    """Raises NotFound when no row serves `model`."""
    if not session.scalar(sa.select(sa.exists().where(Llm.model == model))):
        raise NotFound(f"No LLM serves model '{model}'", code="model_not_found")


def get_llm(session, name: str) -> Llm:
    """The LLM called `name`. Raises NotFound."""
    return rows.get_by_name(session, Llm, name, "LLM")


def create_llm(session, data: dict, cipher) -> Llm:
    """Insert a public LLM, its API key encrypted with `cipher`. Raises
    Conflict when the name is taken."""
    data = dict(data)
    data["api_key"] = cipher.encrypt(data.get("api_key"))
    llm = Llm(kind=Kind.PUBLIC, **data)
    session.add(llm)
    rows.flush_or_conflict(session, f"LLM name '{data['name']}' is taken")
    log.info("created public LLM %s", llm.name)
    return llm


def update_llm(session, name: str, data: dict, cipher) -> Llm:
    """Apply a partial update (a new API key encrypted with `cipher`). With
    `version`, the row must still be at that version. Raises NotFound,
    Conflict (version mismatch)."""
    llm = get_llm(session, name)
    data = dict(data)
    if "api_key" in data:
        data["api_key"] = cipher.encrypt(data["api_key"])
    rows.check_version(llm, data.pop("version", None), "LLM")
    for key, value in data.items():
        setattr(llm, key, value)
    rows.flush_versioned(session, llm, "LLM")
    if llm.kind == Kind.PUBLIC:
        routes.changed_in(session)
    return llm


def delete_llm(session, name: str) -> None:
    """Delete an LLM. Raises NotFound, Conflict when agents are pinned to it."""
    llm = get_llm(session, name)
    pinned = session.scalars(sa.select(Agent.name).where(Agent.llm_id == llm.id)).all()
    if pinned:
        raise Conflict(f"LLM '{name}' has agents pinned to it: {', '.join(sorted(pinned))}",
                       code="llm_in_use", details={"agents": sorted(pinned)})
    session.delete(llm)
    rows.flush_or_conflict(session, f"LLM '{name}' is still referenced", code="llm_in_use")
    if llm.kind == Kind.PUBLIC:
        routes.changed_in(session)
    log.info("deleted LLM %s", name)
