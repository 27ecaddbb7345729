"""Publisher sessions and the lifecycle of their virtual LLMs and agents.

The seeds' rules (VirtualLlmService.register, AgentService.registerVirtualAgents):

- register is a sticky upsert: a new name inserts a virtual row; the same
  session re-registering updates and reactivates its rows; an *inactive*
  virtual row of another session is adopted; a public row, or a live
  (active or hibernating) row of another session, is a 409;
- heartbeat bumps every row of the session and revives inactive ones;
- disconnect flips the session's rows inactive at once.

LLMs and agents follow the same rules, so one sticky upsert serves both.
Services flush; the view commits, then notifies the bus.

Lock order. Every transaction that writes several publishable rows locks
them in one order: agents, then LLMs, then the publisher session, and within
a table by id (`_in_lock_order`; two plans scanning the same rows would
otherwise lock them in different orders). heartbeat, disconnect and
register here follow it, so none of them can wait on another in a cycle (a
deadlock, PostgreSQL's 40P01); register takes its row locks up front, as
its writes would otherwise reach the tables in the unit of work's order
(session, LLMs, agents). gc-sweep (services/gc.py) visits the tables in the
same order and never waits for a row at all.
"""
import logging

import sqlalchemy as sa

from models import DEFAULT_ENDPOINT, Agent, Kind, Llm, Project, PublisherSession, Status, new_id
from services import rows
from services.errors import Conflict, Forbidden, NotFound

log = logging.getLogger(__name__)

# The lock order (see above): agents before LLMs.
PUBLISHED = (Agent, Llm)
LABELS = {Llm: "LLM", Agent: "agent"}
RACED = ("Another registration took one of these names, or this session, at the same "
         "moment; register again")


def register(session, caller, session_id, llms, agents, now):
    """Bind (or create) the publisher session and upsert its LLMs, then its agents.

    Returns (session_id, [Llm], [Agent]). Raises Forbidden (another token owns
    the session), Conflict (public name, another session's live row, or a
    concurrent registration that took a new name or the new session id
    first), NotFound (an agent's LLM or project does not exist).
    """
    session_id = session_id or new_id()
    with rows.conflict_on_race(RACED, "registration_conflict"):
        _lock_published(session, agents, llms)
        publisher = session.get(PublisherSession, session_id, with_for_update=True)
        if publisher is None:
            session.add(PublisherSession(id=session_id, owner=caller.id,
                                         last_heartbeat_at=now))
        elif publisher.owner != caller.id:
            raise Forbidden(f"Session '{session_id}' belongs to another token",
                            code="foreign_session")
        else:
            publisher.last_heartbeat_at = now

        llm_rows = []
        for spec in llms:
            # The payload is the row's whole truth.
            spec = {"max_concurrency": None, "endpoints": [DEFAULT_ENDPOINT], **spec}
            status = spec.pop("initial_status", Status.ACTIVE)
            llm_rows.append(_upsert(session, Llm, spec, session_id, status, now))
        session.flush()  # the agents below may pin the LLMs just inserted

        agent_rows = []
        for spec in agents:
            spec = dict(spec)
            spec["llm_id"] = _agent_llm_id(session, caller, session_id, spec)
            if "project" in spec:
                project = spec.pop("project")
                spec["project_id"] = project and _id_by_name(session, Project, project)
            row = _upsert(session, Agent, spec, session_id, Status.ACTIVE, now, caller)
            row.owner = row.owner or caller.id
            agent_rows.append(row)
        session.flush()
    log.info("registered session %s: %d LLMs, %d agents", session_id, len(llm_rows),
             len(agent_rows))
    return session_id, llm_rows, agent_rows


def _lock_published(session, agents, llms) -> None:
    """Lock the existing rows a register will write, in the lock order (agents,
    LLMs; the session comes next), each table's rows by id. A row inserted
    meanwhile under one of the names is a unique violation at the flush.
    (On SQLite a plain read: its single writer already serializes.)"""
    for model, specs in ((Agent, agents), (Llm, llms)):
        names = [spec["name"] for spec in specs]
        if names:
            session.execute(_locking(model, model.name.in_(names)))


def _locking(model, condition):
    """SELECT the ids of `model`'s rows matching `condition`, locking them by id."""
    return (sa.select(model.id).where(condition).order_by(model.id).correlate(None)
            .with_for_update())


def _in_lock_order(model, condition):
    """`condition` for an UPDATE of `model` that takes its row locks by id."""
    return model.id.in_(_locking(model, condition))


def owned_session(session, caller, session_id) -> PublisherSession:
    """The publisher session, if the caller may use it. Raises NotFound, Forbidden."""
    publisher = session.get(PublisherSession, session_id)
    if publisher is None:
        raise NotFound(f"Session '{session_id}' not found; register again",
                       code="session_not_found")
    if publisher.owner != caller.id and not caller.is_admin:
        raise Forbidden(f"Session '{session_id}' belongs to another token",
                        code="foreign_session")
    return publisher


_SESSION_OWNER = (sa.select(PublisherSession.owner)
                  .where(PublisherSession.id == sa.bindparam("session_id")))


def check_session_owner(session, caller, session_id, recent=None) -> None:
    """`owned_session`'s check alone, without loading the row (the hot path
    of polls and chunk POSTs). Raises NotFound, Forbidden. With `recent` (a
    TtlMap of session id -> owner, the worker's), an owner read lately is
    not read again: a session never changes owner, and one deleted elsewhere
    is seen within the map's ttl (its polls meanwhile get no tasks)."""
    owner = recent.get(session_id) if recent is not None else None
    if owner is None:
        owner = session.connection().execute(_SESSION_OWNER,
                                             {"session_id": session_id}).scalar()
        if owner is not None and recent is not None:
            recent.put(session_id, owner)
    if owner is None:
        raise NotFound(f"Session '{session_id}' not found; register again",
                       code="session_not_found")
    if owner != caller.id and not caller.is_admin:
        raise Forbidden(f"Session '{session_id}' belongs to another token",
                        code="foreign_session")


def heartbeat(session, caller, session_id, now) -> int:
    """Bump every row of the session (agents, then LLMs, then the session
    itself: the lock order) and revive inactive ones; returns how many rows
    it owns. Raises NotFound when the session, or every row it had, is gone
    (the publisher then registers again), Forbidden."""
    publisher = owned_session(session, caller, session_id)
    owned = 0
    for model in PUBLISHED:
        owned += session.execute(
            sa.update(model)
            .where(_in_lock_order(model, sa.and_(model.provider_session_id == session_id,
                                                 model.kind == Kind.VIRTUAL)))
            .values(last_heartbeat_at=now,
                    status=sa.case((model.status == Status.INACTIVE, Status.ACTIVE),
                                   else_=model.status),
                    inactive_since=None)
            .execution_options(synchronize_session=False)).rowcount
    if owned == 0:
        raise NotFound(f"Session '{session_id}' has no rows left; register again",
                       code="session_not_found")
    publisher.last_heartbeat_at = now  # flushed last, at the commit
    return owned


def disconnect(session, caller, session_id, now) -> int:
    """Flip the session's rows inactive at once (agents, then LLMs: the lock
    order); returns how many changed. The caller then fails the session's
    in-flight tasks on the bus."""
    owned_session(session, caller, session_id)
    return sum(mark_inactive(session, model, now, model.provider_session_id == session_id)
               for model in PUBLISHED)


def mark_inactive(session, model, now, condition) -> int:
    """Set-based: every virtual, not yet inactive row of `model` matching
    `condition` goes inactive as of `now` (locked in the lock order). Returns
    how many did."""
    return session.execute(
        sa.update(model)
        .where(_in_lock_order(model, sa.and_(model.kind == Kind.VIRTUAL,
                                             model.status != Status.INACTIVE, condition)))
        .values(status=Status.INACTIVE, inactive_since=now)
        .execution_options(synchronize_session=False)).rowcount


def task_owner(caller) -> str | None:
    """The owner a caller's task posts must match: its token (an admin: any)."""
    return None if caller.is_admin else caller.id


def apply_outcome(session, task, outcome, now) -> None:
    """What a posted outcome changes in the database: a successful wake makes
    the hibernating LLM active (the seeds' runWake)."""
    if task["kind"] == "wake" and 200 <= outcome.get("status", 0) < 300:
        mark_awake(session, task["llm"], task["session_id"], now)


def mark_awake(session, llm_name, session_id, now) -> bool:
    """A wake task succeeded: the hibernating LLM is active from now."""
    return session.execute(
        sa.update(Llm)
        .where(Llm.name == llm_name, Llm.provider_session_id == session_id,
               Llm.status == Status.HIBERNATING)
        .values(status=Status.ACTIVE, last_heartbeat_at=now, inactive_since=None)
        .execution_options(synchronize_session=False)).rowcount == 1


def _upsert(session, model, spec, session_id, status, now, caller=None):
    label = LABELS[model]
    row = session.scalar(sa.select(model).where(model.name == spec["name"]))
    if row is None:
        row = model(kind=Kind.VIRTUAL)
        session.add(row)
    elif row.kind == Kind.PUBLIC:
        raise Conflict(f"Cannot publish over public {label} '{row.name}'", code="public_name")
    elif row.provider_session_id != session_id and row.status != Status.INACTIVE:
        raise Conflict(f"Virtual {label} '{row.name}' is already active under a different "
                       f"session", code="session_conflict")
    elif (caller is not None and row.owner not in (None, caller.id)
          and not caller.is_admin):
        # An agent's chat threads hang on its row: another publisher adopting
        # it would be handed their history. It waits for gc-sweep instead.
        raise Conflict(f"Virtual {label} '{row.name}' belongs to another publisher until "
                       f"gc-sweep retires it", code="owner_conflict")
    for key, value in spec.items():
        setattr(row, key, value)
    row.provider_session_id = session_id
    row.status = status
    row.last_heartbeat_at = now
    row.inactive_since = None
    return row


def _agent_llm_id(session, caller, session_id, spec):
    """A publisher's agent runs on one of its session's own LLMs: it may not
    spend an operator's upstream key, nor another publisher's GPU, under a
    system prompt of its own. (An admin may pin any LLM.)"""
    name = spec.pop("llm")
    row = session.execute(sa.select(Llm.id, Llm.provider_session_id)
                          .where(Llm.name == name)).first()
    if row is None:
        raise NotFound(f"LLM '{name}' not found", code="llm_not_found")
    if row.provider_session_id != session_id and not caller.is_admin:
        raise Forbidden(f"Agent '{spec['name']}' must run on one of this session's LLMs, "
                        f"not '{name}'", code="foreign_llm")
    return row.id


def _id_by_name(session, model, name):
    row_id = session.scalar(sa.select(model.id).where(model.name == name))
    if row_id is None:
        raise NotFound(f"{model.__name__} '{name}' not found", code="not_found")
    return row_id
