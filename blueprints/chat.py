"""Threads and chat with agents. A client sees its own threads; an admin, all.

The chat view owns three short transactions (see services/chat.py): store the
turn and commit, run the inference holding no connection, store the outcome.
"""
import logging

from flask import Blueprint, Response, current_app

from blueprints.common import caller, json_body, require
from extensions import db
from jsonio import dumps
from models import utcnow
from schemas.agent import chat_request, thread_create
from services import chat
from services.errors import ServiceError, envelope
from services.inference import SSE_KEEPALIVE, sse_event

log = logging.getLogger(__name__)

bp = Blueprint("chat", __name__)

CLIENT_GONE = "The client went away before the answer finished"


@bp.get("/agents/<name>/threads")
@require("client")
def list_threads(name):
    return [t.view() for t in chat.list_threads(db.session, name, caller())]


@bp.post("/agents/<name>/threads")
@require("client")
def create_thread(name):
    data = json_body(thread_create)
    thread = chat.create_thread(db.session, name, caller(), data["title"], utcnow())
    db.session.commit()
    return thread.view(), 201


@bp.get("/threads/<thread_id>")
@require("client")
def get_thread(thread_id):
    return chat.get_thread(db.session, thread_id, caller()).view()


@bp.get("/threads/<thread_id>/messages")
@require("client")
def list_messages(thread_id):
    return [m.view() for m in chat.list_messages(db.session, thread_id, caller())]


@bp.delete("/threads/<thread_id>")
@require("client")
def delete_thread(thread_id):
    chat.delete_thread(db.session, thread_id, caller())
    db.session.commit()
    return "", 204


@bp.post("/agents/<name>/chat")
@require("client")
def chat_with_agent(name):
    turn = chat.start_turn(db.session, name, caller(), json_body(chat_request), utcnow())
    db.session.commit()
    db.session.close()  # hold no pooled connection while the relay waits
    relay = current_app.extensions["relay"]
    try:
        reply = relay.infer(turn.target, turn.body)
        answer = None if reply.stream is not None else chat.read_completion(
            turn.target.name, reply)
    except ServiceError as exc:
        _fail(turn, exc.message)
        raise
    except Exception:
        _fail(turn, "Internal error")
        raise
    if turn.stream:
        app = current_app._get_current_object()
        return Response(_events(app, turn, reply, answer), content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    chat.finish_turn(db.session, turn, answer, utcnow())
    db.session.commit()
    return {"thread_id": turn.thread_id, "message_id": turn.message_id,
            "assistant": answer.content, "tool_calls": answer.tool_calls,
            "usage": answer.usage}


def _events(app, turn, reply, answer):
    """The chat's SSE: `text` deltas, then `final` (or `error`). The outcome is
    stored when the stream settles, in an app context of its own: the
    request's is gone by then."""
    if answer is not None:  # the backend answered whole although asked to stream
        deltas = [answer.content] if answer.content else []
    else:
        answer = chat.Answer()
        deltas = chat.read_stream(turn.target.name, reply, answer)
    try:
        for delta in deltas:
            yield SSE_KEEPALIVE if delta is None else _event({"type": "text", "delta": delta})
    except ServiceError as exc:
        _fail(turn, exc.message, answer.content, app)
        yield _event({"type": "error", **envelope(exc.message, exc.type, exc.code),
                      "thread_id": turn.thread_id, "message_id": turn.message_id})
        return
    except GeneratorExit:
        _fail(turn, CLIENT_GONE, answer.content, app)
        raise
    except Exception:
        log.exception("chat stream of thread %s failed", turn.thread_id)
        _fail(turn, "Internal error", answer.content, app)
        yield _event({"type": "error", **envelope("Internal server error", "server_error",
                                                  "internal_error"),
                      "thread_id": turn.thread_id, "message_id": turn.message_id})
        return
    finally:
        if reply.stream is not None:
            reply.stream.close()  # releases the bus task, or the upstream connection
    _store(app, chat.finish_turn, turn, answer)
    yield _event({"type": "final", "thread_id": turn.thread_id,
                  "message_id": turn.message_id, "tool_calls": answer.tool_calls,
                  "usage": answer.usage})


def _event(payload) -> bytes:
    return sse_event(dumps(payload))


def _fail(turn, error, partial="", app=None):
    _store(app, chat.fail_turn, turn, error, partial=partial)


def _store(app, settle, turn, *args, **kwargs):
    """Settle the turn and commit; in a fresh app context when `app` is given.
    A failure here is logged: the message then stays `pending`, never wrong."""
    try:
        if app is None:
            settle(db.session, turn, *args, now=utcnow(), **kwargs)
            db.session.commit()
            return
        with app.app_context():
            settle(db.session, turn, *args, now=utcnow(), **kwargs)
            db.session.commit()
    except Exception:
        log.exception("could not store the outcome of thread %s", turn.thread_id)
