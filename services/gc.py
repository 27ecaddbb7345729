"""`flask gc-sweep`: the backstop for publishers that vanished without a DELETE.

Set-based, a few statements whatever the row count:

1. agents first, then LLMs: virtual rows that are active *or hibernating*
   with a heartbeat older than the timeout go inactive;
2. virtual rows inactive for longer than the retention are deleted; right
   before the LLMs go, any virtual agent still pinned to one of them is
   deleted too (agent → LLM is restrict). An LLM that a public agent pins is
   kept: an operator's agent is not ours to delete;
3. publisher sessions with no rows left and no heartbeat within the
   retention are forgotten;
4. with `interrupted_after`, assistant messages still `pending` that long
   after they were started (their worker was killed mid-turn: no request
   lives that long) are settled `error`.

Public rows are never touched. Every statement re-checks its condition, so a
second sweep finds nothing left to do.

Concurrency (PostgreSQL). One sweep runs at a time: a sweep that finds
another one's transaction-level advisory lock taken does nothing and says so
(`skipped`), which keeps cron on several hosts safe. The sweep follows the
lock order of services/lifecycle.py (agents, then LLMs, then sessions), and
never waits for a row another transaction holds: each statement picks its
rows with `FOR UPDATE SKIP LOCKED`. A row locked right now is being
heartbeated, registered or disconnected, so it is not this sweep's to
judge; the next sweep sees it settled. Heartbeats may wait for the sweep's
locks (bounded by their lock_timeout), the sweep never for theirs, so the
two cannot deadlock.
"""
from datetime import timedelta

import sqlalchemy as sa

from models import Agent, ChatMessage, Kind, Llm, PublisherSession, Status
from models.chat import MessageStatus
from services import database

LIVE = (Status.ACTIVE, Status.HIBERNATING)
# pg_try_advisory_xact_lock's key for "a gc-sweep is running" (any constant
# bigint; advisory locks are per database).
SWEEP_LOCK = 0x5377_6565_7047_43  # "SweepGC"


INTERRUPTED = "interrupted: the server stopped before the answer was stored"


def sweep(session, now, heartbeat_timeout: float, retention: float,
          interrupted_after: float | None = None) -> dict:
    """Run one sweep as of `now` (naive UTC). Returns
    `{marked_inactive, deleted, llms: {marked_inactive, deleted}, agents: {...}}`,
    and `chat_messages: {settled}` with `interrupted_after`. While another
    sweep's transaction runs (PostgreSQL), it does nothing: every count is 0
    and `skipped` is true."""
    stale_before = now - timedelta(seconds=heartbeat_timeout)
    expired_before = now - timedelta(seconds=retention)
    zero = {"marked_inactive": 0, "deleted": 0}
    if not database.try_transaction_lock(session, SWEEP_LOCK):
        result = {**zero, "llms": dict(zero), "agents": dict(zero), "skipped": True}
        if interrupted_after is not None:
            result["chat_messages"] = {"settled": 0}
        return result

    agents = {"marked_inactive": _mark_stale(session, Agent, now, stale_before),
              "deleted": _delete_expired(session, Agent, expired_before)}
    llms = {"marked_inactive": _mark_stale(session, Llm, now, stale_before)}
    agents["deleted"] += _delete_agents_pinned_to_expired_llms(session, expired_before)
    llms["deleted"] = _delete_expired(session, Llm, expired_before)
    _forget_empty_sessions(session, expired_before)
    result = {"marked_inactive": agents["marked_inactive"] + llms["marked_inactive"],
              "deleted": agents["deleted"] + llms["deleted"],
              "llms": llms, "agents": agents}
    if interrupted_after is not None:
        result["chat_messages"] = {"settled": _settle_interrupted_messages(
            session, now - timedelta(seconds=interrupted_after))}
    return result


def _unlocked(model, condition):
    """The ids of `model`'s rows matching `condition` that no other transaction
    holds, locked for this one (PostgreSQL; SQLite has no row locks)."""
    key = sa.inspect(model).primary_key[0]
    # Its own FROM, not correlated to the UPDATE or DELETE of the same table.
    return (sa.select(key).where(condition).correlate(None)
            .with_for_update(skip_locked=True))


def _settle_interrupted_messages(session, started_before) -> int:
    pending = sa.and_(ChatMessage.status == MessageStatus.PENDING,
                      ChatMessage.created_at < started_before)
    return session.execute(
        sa.update(ChatMessage)
        .where(ChatMessage.id.in_(_unlocked(ChatMessage, pending)))
        .values(status=MessageStatus.ERROR, error=INTERRUPTED)
        .execution_options(synchronize_session=False)).rowcount


def _mark_stale(session, model, now, stale_before) -> int:
    stale = sa.and_(model.kind == Kind.VIRTUAL, model.status.in_(LIVE),
                    model.last_heartbeat_at < stale_before)
    return session.execute(
        sa.update(model)
        .where(model.id.in_(_unlocked(model, stale)))
        .values(status=Status.INACTIVE, inactive_since=now)
        .execution_options(synchronize_session=False)).rowcount


def _expired(model, expired_before):
    return sa.and_(model.kind == Kind.VIRTUAL, model.status == Status.INACTIVE,
                   model.inactive_since < expired_before)


def _delete_expired(session, model, expired_before) -> int:
    condition = _expired(model, expired_before)
    if model is Llm:
        condition = sa.and_(condition, ~sa.exists().where(Agent.llm_id == Llm.id))
    return session.execute(sa.delete(model).where(model.id.in_(_unlocked(model, condition)))
                           .execution_options(synchronize_session=False)).rowcount


def _delete_agents_pinned_to_expired_llms(session, expired_before) -> int:
    expiring = sa.select(Llm.id).where(_expired(Llm, expired_before))
    pinned = sa.and_(Agent.kind == Kind.VIRTUAL, Agent.llm_id.in_(expiring))
    return session.execute(
        sa.delete(Agent).where(Agent.id.in_(_unlocked(Agent, pinned)))
        .execution_options(synchronize_session=False)).rowcount


def _forget_empty_sessions(session, expired_before) -> int:
    owns_rows = sa.or_(
        sa.exists().where(Llm.provider_session_id == PublisherSession.id),
        sa.exists().where(Agent.provider_session_id == PublisherSession.id))
    forgotten = sa.and_(PublisherSession.last_heartbeat_at < expired_before, ~owns_rows)
    return session.execute(
        sa.delete(PublisherSession)
        .where(PublisherSession.id.in_(_unlocked(PublisherSession, forgotten)))
        .execution_options(synchronize_session=False)).rowcount
