"""The status page's login and its picture of the server (DESIGN.md,
"Operations": status page)."""
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from models import Agent, ApiToken, Kind, Llm, PublisherSession, Role, Status, iso
from services import tokens, usage
from services.errors import Forbidden, ServiceError

log = logging.getLogger(__name__)

ROW_LIMIT = 500          # LLMs and agents shown; the page says how many more there are
SESSION_LIMIT = 200
SESSION_RECENT = timedelta(hours=1)  # sessions shown: live, or heard from this recently
USAGE_WINDOW = timedelta(hours=24)
STATUS_ORDER = {Status.ACTIVE: 0, Status.HIBERNATING: 1, Status.INACTIVE: 2}


def login(session, raw_token: str, now) -> tokens.Caller:
    """The caller of an admin token typed into the login form. Raises
    Unauthorized (unknown or revoked token), Forbidden (not an admin's)."""
    caller, _ = tokens.authenticate(session, f"Bearer {raw_token}", now)
    if not caller.is_admin:
        raise Forbidden("Only an admin token may open the status page", code="role_forbidden")
    return caller


def admin_by_id(session, token_id) -> tokens.Caller | None:
    """The admin behind a signed-in page, while their token is live and an
    admin's (a revoked token signs the page out at its next refresh)."""
    if not isinstance(token_id, str):
        return None
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None or row.role != Role.ADMIN:
        return None
    return tokens.Caller(id=row.id, name=row.name, role=row.role)


def age(now: datetime, then: datetime | None) -> str:
    """`12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`; `never`."""
    if then is None:
        return "never"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


@dataclass(frozen=True)
class RowLine:
    name: str
    kind: str
    status: str
    model: str
    last_heartbeat: str
    last_heartbeat_at: str | None
    in_flight: int
    waiting: int
    capacity: int | None = None
    via: str | None = None  # an agent's LLM, or `pool:<model>`


@dataclass(frozen=True)
class SessionLine:
    id: str
    owner: str
    live: bool
    rows: int
    created: str
    last_heartbeat: str


@dataclass
class Overview:
    generated_at: str
    llms: list[RowLine]
    llms_total: int
    agents: list[RowLine]
    agents_total: int
    sessions: list[SessionLine]
    usage: list[dict]
    errors: list[dict]
    gauges: dict | None = None
    problems: list[str] = field(default_factory=list)


def overview(session, bus, recent_errors, now, *, bucket_seconds: int = 3600) -> Overview:
    """What the page shows. A part that cannot be read (the bus away, say) is
    left out and named in `problems`, so the page still shows the rest."""
    problems = []
    try:
        gauges = bus.gauges()
    except ServiceError as exc:
        gauges = None
        problems.append(f"task bus: {exc.message}")
    waiting = (gauges or {}).get("tasks_waiting", {})
    in_flight = (gauges or {}).get("tasks_in_flight", {})

    llms = session.scalars(sa.select(Llm).order_by(
        _status_rank(Llm), Llm.name).limit(ROW_LIMIT)).all()
    agents = session.scalars(sa.select(Agent).order_by(
        _status_rank(Agent), Agent.name).limit(ROW_LIMIT)).all()
    usage_rows = usage.summary(session, now - USAGE_WINDOW, now, bucket_seconds=bucket_seconds)
    return Overview(
        generated_at=iso(now),
        llms=[RowLine(llm.name, llm.kind, llm.status, llm.model, _heartbeat(now, llm),
                      iso(llm.last_heartbeat_at), in_flight.get(llm.name, 0),
                      waiting.get(llm.name, 0), llm.max_concurrency) for llm in llms],
        llms_total=session.scalar(sa.select(sa.func.count()).select_from(Llm)),
        agents=[_agent_line(now, agent, llms, in_flight, waiting) for agent in agents],
        agents_total=session.scalar(sa.select(sa.func.count()).select_from(Agent)),
        sessions=_sessions(session, bus, now, problems),
        usage=usage_rows,
        errors=recent_errors.latest(),
        gauges=gauges,
        problems=problems,
    )


def _agent_line(now, agent, llms, in_flight, waiting) -> RowLine:
    """An agent's row: its LLM's model and tasks, or for a pool agent, those of
    the pool's members."""
    if agent.llm is not None:
        via, model, members = agent.llm.name, agent.llm.model, [agent.llm.name]
    else:
        via, model = f"pool:{agent.model}", agent.model
        members = [llm.name for llm in llms if llm.model == agent.model]
    return RowLine(agent.name, agent.kind, agent.status, model, _heartbeat(now, agent),
                   iso(agent.last_heartbeat_at), sum(in_flight.get(m, 0) for m in members),
                   sum(waiting.get(m, 0) for m in members), via=via)


def _heartbeat(now, row) -> str:
    """A virtual row's last heartbeat; a public row has none to have."""
    return "–" if row.kind == Kind.PUBLIC else age(now, row.last_heartbeat_at)


def _status_rank(model):
    return sa.case({status.value: rank for status, rank in STATUS_ORDER.items()},
                   value=model.status, else_=len(STATUS_ORDER))


def _sessions(session, bus, now, problems) -> list[SessionLine]:
    rows = sa.select(Llm.provider_session_id, sa.func.count()).group_by(
        Llm.provider_session_id).subquery()
    query = (sa.select(PublisherSession, ApiToken.name, rows.c[1])
             .join(ApiToken, ApiToken.id == PublisherSession.owner)
             .outerjoin(rows, rows.c.provider_session_id == PublisherSession.id)
             .where(sa.or_(PublisherSession.last_heartbeat_at >= now - SESSION_RECENT,
                           PublisherSession.created_at >= now - SESSION_RECENT))
             .order_by(PublisherSession.last_heartbeat_at.desc().nulls_last())
             .limit(SESSION_LIMIT))
    lines = []
    for publisher_session, owner, count in session.execute(query):
        try:
            live = bus.is_live(publisher_session.id)
        except ServiceError as exc:
            if not problems or not problems[-1].startswith("task bus"):
                problems.append(f"task bus: {exc.message}")
            live = False
        lines.append(SessionLine(publisher_session.id, owner, live, count or 0,
                                 age(now, publisher_session.created_at),
                                 age(now, publisher_session.last_heartbeat_at)))
    lines.sort(key=lambda line: not line.live)
    return lines
