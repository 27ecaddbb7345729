"""The publisher protocol: register, heartbeat, long-poll, result, chunks (one
task's, or many tasks' of a session at once), disconnect."""
import logging
import math

from flask import Blueprint, current_app, request

from blueprints.common import caller, check_session_owner, json_body, peer_connected, require
from extensions import db
from models import utcnow
from schemas import publisher as schemas
from services import lifecycle, streams

bp = Blueprint("publishers", __name__)
log = logging.getLogger(__name__)


def bus():
    return current_app.extensions["task_bus"]


@bp.post("/publishers/register")
@require("publisher")
def register():
    data = json_body(schemas.register)
    session_id, llms, agents = lifecycle.register(
        db.session, caller(), data["session_id"], data["llms"], data["agents"], utcnow())
    bus().touch(session_id)  # live first: whoever sees the rows active finds the session live
    db.session.commit()
    return {"session_id": session_id, "llms": [llm.view() for llm in llms],
            "agents": [agent.view() for agent in agents]}, 201


@bp.post("/publishers/<session_id>/heartbeat")
@require("publisher")
def heartbeat(session_id):
    lifecycle.heartbeat(db.session, caller(), session_id, utcnow())
    db.session.commit()
    bus().seen(session_id)  # a publisher busy with a long task is not lost
    return {"ok": True}


@bp.get("/publishers/<session_id>/tasks")
@require("publisher")
def poll(session_id):
    query = schemas.poll_query.load(request.args)
    wait = min(query.get("wait", math.inf), float(current_app.config["POLL_WAIT_MAX"]))
    check_session_owner(session_id)
    db.session.close()  # hold no pooled connection during the long-poll
    return {"tasks": bus().poll(session_id, wait, peer_connected(request.environ),
                                ack=query.get("ack"))}


@bp.delete("/publishers/<session_id>")
@require("publisher")
def disconnect(session_id):
    rows = lifecycle.disconnect(db.session, caller(), session_id, utcnow())
    db.session.commit()
    failed = bus().drop_session(session_id, "publisher disconnected")
    log.info("session %s disconnected: %d rows inactive, %d tasks failed", session_id, rows,
             failed)
    return "", 204


@bp.post("/tasks/<task_id>/result")
@require("publisher")
def post_result(task_id):
    outcome = json_body(schemas.result)
    owner = lifecycle.task_owner(caller())
    waking = bus().complete(task_id, outcome, owner=owner, unless_kind="wake")
    if waking is not None:  # commit, then notify: woken requests must find the row active
        lifecycle.apply_outcome(db.session, waking, outcome, utcnow())
        db.session.commit()
        bus().complete(task_id, outcome, owner=owner)
    return {"accepted": True}


@bp.post("/tasks/<task_id>/chunks")
@require("publisher")
def post_chunks(task_id):
    data = json_body(schemas.chunks)
    streams.push_task_chunks(bus(), task_id, lifecycle.task_owner(caller()), data)
    return {"accepted": True}


@bp.post("/publishers/<session_id>/chunks")
@require("publisher")
def post_session_chunks(session_id):
    data = json_body(schemas.session_chunks)
    owner = lifecycle.task_owner(caller())
    check_session_owner(session_id)
    db.session.close()  # hold no pooled connection during the bus call
    return {"results": streams.push_session_chunks(bus(), session_id, owner, data["tasks"])}
