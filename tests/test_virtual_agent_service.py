"""Counterparts of the seed's `virtual-agent-service.test.ts` (13 tests): the
virtual-agent lifecycle of services/lifecycle.py and services/gc.py, and its
cascade with the LLMs', against a real SQLite database.

The seed's AgentService methods map onto one code path for LLMs and agents:
registerVirtualAgents → lifecycle.register (agents after LLMs);
heartbeatVirtualAgents → lifecycle.heartbeat; markVirtualAgentsInactiveBySession
and unbindSession → lifecycle.disconnect (DELETE /publishers/<id>);
gcSweepVirtualAgents and deleteVirtualAgentsForLlm → gc.sweep.
"""
from datetime import timedelta

import pytest
import sqlalchemy as sa

from extensions import db
from models import Agent, Llm, utcnow
from services import gc, lifecycle
from services.errors import Conflict, NotFound

HEARTBEAT_TIMEOUT = 90.0
RETENTION = 4 * 3600.0
LLM = {"name": "vllm-local", "type": "openai", "model": "m"}


def register(publisher, session_id, agents, llms=(LLM,), now=None):
    result = lifecycle.register(db.session, publisher, session_id, list(llms),
                                [{"llm": "vllm-local", **a} for a in agents], now or utcnow())
    db.session.commit()
    return result


def agent(name):
    db.session.expire_all()
    return db.session.scalar(sa.select(Agent).where(Agent.name == name))


def llm(name="vllm-local"):
    db.session.expire_all()
    return db.session.scalar(sa.select(Llm).where(Llm.name == name))


def set_rows(model, names, **values):
    db.session.execute(sa.update(model).where(model.name.in_(names)).values(**values)
                       .execution_options(synchronize_session=False))
    db.session.commit()


def sweep(now=None):
    result = gc.sweep(db.session, now or utcnow(), HEARTBEAT_TIMEOUT, RETENTION)
    db.session.commit()
    return result


def ago(**delta):
    return utcnow() - timedelta(**delta)


# -- AgentService: the virtual-agent lifecycle ---------------------------------------

def test_register_inserts_new_agents_as_virtual_and_active(publisher):
    _, _, agents = register(publisher, "sess-1", [
        {"name": "local-coder", "description": "d", "system_prompt": "s"}])
    assert len(agents) == 1
    view = agent("local-coder").view()
    assert (view["kind"], view["status"], view["provider_session_id"]) == (
        "virtual", "active", "sess-1")
    assert (view["llm"], view["system_prompt"], view["owner"]) == (
        "vllm-local", "s", publisher.id)


def test_register_reuses_the_same_sessions_row_on_sticky_reconnect(publisher):
    _, _, first = register(publisher, "sess-1", [{"name": "local-coder"}])
    first_id = first[0].id
    lifecycle.disconnect(db.session, publisher, "sess-1", utcnow())
    db.session.commit()
    assert agent("local-coder").status == "inactive"
    register(publisher, "sess-1", [{"name": "local-coder"}])
    row = agent("local-coder")
    assert (row.id, row.status, row.inactive_since) == (first_id, "active", None)


def test_register_adopts_an_inactive_virtual_agent_of_another_session(publisher):
    _, _, first = register(publisher, "old-session", [{"name": "local-coder"}])
    lifecycle.disconnect(db.session, publisher, "old-session", utcnow())
    db.session.commit()
    register(publisher, "new-session", [{"name": "local-coder"}])
    row = agent("local-coder")
    assert (row.id, row.status, row.provider_session_id) == (
        first[0].id, "active", "new-session")


def test_register_refuses_to_publish_over_a_public_agent(publisher):
    db.session.add(Llm(name="public-llm", model="m", url="http://u.test/v1"))
    db.session.flush()
    db.session.add(Agent(name="reviewer", llm_id=llm("public-llm").id))
    db.session.commit()
    with pytest.raises(Conflict, match="Cannot publish over public agent 'reviewer'") as exc:
        register(publisher, "sess-x", [{"name": "reviewer"}])
    assert exc.value.status == 409
    db.session.rollback()
    assert agent("reviewer").kind == "public"


def test_register_refuses_an_agent_active_under_another_session(publisher):
    register(publisher, "other", [{"name": "local-coder"}])
    with pytest.raises(Conflict, match="already active under a different session"):
        register(publisher, "mine", [{"name": "local-coder", "llm": "vllm-mine"}],
                 llms=[{"name": "vllm-mine", "model": "m"}])
    db.session.rollback()
    assert agent("local-coder").provider_session_id == "other"


def test_heartbeat_bumps_and_revives_inactive_agents(publisher):
    register(publisher, "sess", [{"name": "a"}])
    past = ago(seconds=5)
    set_rows(Agent, ["a"], status="inactive", last_heartbeat_at=past, inactive_since=past)
    lifecycle.heartbeat(db.session, publisher, "sess", utcnow())
    db.session.commit()
    row = agent("a")
    assert (row.status, row.inactive_since) == ("active", None)
    assert row.last_heartbeat_at > past


def test_disconnect_flips_only_the_sessions_agents_inactive(publisher):
    register(publisher, "sess", [{"name": "a"}, {"name": "b"}])
    register(publisher, "other", [{"name": "c", "llm": "other-llm"}],
             llms=[{**LLM, "name": "other-llm"}])
    lifecycle.disconnect(db.session, publisher, "sess", utcnow())
    db.session.commit()
    assert [agent(n).status for n in ("a", "b", "c")] == ["inactive", "inactive", "active"]


def test_gc_deletes_only_the_virtual_agents_pinned_to_an_expiring_llm(publisher):
    register(publisher, "sess", [{"name": "v-1", "llm": "doomed"},
                                 {"name": "v-2", "llm": "doomed"},
                                 {"name": "v-other", "llm": "safe"}],
             llms=[{**LLM, "name": "doomed"}, {**LLM, "name": "safe"}])
    db.session.add(Agent(name="pub-1", llm_id=llm("doomed").id))
    db.session.commit()
    set_rows(Llm, ["doomed"], status="inactive", inactive_since=ago(hours=5))
    result = sweep()
    assert result["agents"]["deleted"] == 2
    assert agent("v-1") is None and agent("v-2") is None
    assert agent("pub-1") is not None and agent("v-other") is not None
    assert llm("doomed") is not None  # a public agent still pins it: not ours to delete


def test_gc_flips_stale_agents_deletes_long_inactive_ones_and_is_idempotent(publisher):
    register(publisher, "a", [{"name": "stale"}, {"name": "old"}])
    db.session.add(Agent(name="pub", llm_id=llm().id))
    db.session.commit()
    set_rows(Agent, ["stale"], last_heartbeat_at=ago(minutes=5))
    set_rows(Agent, ["old"], status="inactive", inactive_since=ago(hours=5))
    result = sweep()
    assert result["agents"] == {"marked_inactive": 1, "deleted": 1}
    assert agent("stale").status == "inactive"
    assert agent("old") is None
    assert agent("pub").status == "active"
    assert sweep()["agents"] == {"marked_inactive": 0, "deleted": 0}


# -- VirtualLlmService: the cascade through agents ----------------------------------

def test_disconnect_cascades_from_the_llms_to_the_sessions_agents(client, auth, publisher):
    register(publisher, "sess", [{"name": "local-coder"}])
    response = client.delete("/api/v1/publishers/sess", headers=auth("publisher"))
    assert response.status_code == 204
    assert (llm().status, agent("local-coder").status) == ("inactive", "inactive")
    assert agent("local-coder").inactive_since is not None


def test_gc_deletes_virtual_agents_before_their_pinned_virtual_llm(publisher):
    register(publisher, "sess", [{"name": "pinned"}])
    long_ago = ago(hours=5)
    set_rows(Llm, ["vllm-local"], status="inactive", inactive_since=long_ago)
    set_rows(Agent, ["pinned"], status="inactive", inactive_since=long_ago)
    result = sweep()
    assert result["deleted"] >= 2
    assert llm() is None and agent("pinned") is None


def test_gc_defensive_cascade_drops_an_agent_whose_heartbeat_lagged_its_llm(publisher):
    register(publisher, "sess", [{"name": "pinned"}])
    set_rows(Llm, ["vllm-local"], status="inactive", inactive_since=ago(hours=5))
    set_rows(Agent, ["pinned"], status="inactive", inactive_since=ago(hours=1))
    sweep()
    assert llm() is None and agent("pinned") is None


def test_heartbeat_cascades_to_the_sessions_virtual_agents(publisher):
    past = ago(seconds=10)
    register(publisher, "sess", [{"name": "local-coder"}], now=past)
    lifecycle.heartbeat(db.session, publisher, "sess", utcnow())
    db.session.commit()
    assert agent("local-coder").last_heartbeat_at > past
    assert llm().last_heartbeat_at > past


# -- beyond the seed ----------------------------------------------------------------

def test_register_an_agent_on_an_unknown_llm_is_404(publisher):
    with pytest.raises(NotFound) as exc:
        register(publisher, "sess", [{"name": "a", "llm": "nope"}], llms=[])
    assert exc.value.status == 404
