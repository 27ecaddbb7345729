"""Threads and chat with agents. A client sees its own threads; an admin, all.

The chat view owns three short transactions (see services/chat.py): store the
turn and commit, run the inference holding no connection, store the outcome
(in a transaction from `_transaction_factory`, retried while the database is
busy).
"""
from contextlib import contextmanager

from flask import Blueprint, Response, current_app, request

from blueprints import instrumentation
from blueprints.common import caller, json_body, peer_connected, require
import extensions
from extensions import db
from models import utcnow
from schemas.agent import chat_request, thread_create
from services import chat

bp = Blueprint("chat", __name__)


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
    turn = chat.start_turn(db.session, name, caller(), json_body(chat_request), utcnow(),
                           current_app.extensions["task_bus"].is_live)
    db.session.commit()
    db.session.close()  # hold no pooled connection while the relay waits
    relay = instrumentation.observed(extensions.relay())
    transaction = _transaction_factory(current_app._get_current_object())
    if turn.stream:
        events = chat.stream_turn(relay, turn, transaction, utcnow)
        return Response(events, content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer, saved = chat.complete_turn(relay, turn, transaction, utcnow,
                                       client_connected=peer_connected(request.environ))
    # An answer the database would not take is still the caller's: it is paid for.
    return {"thread_id": turn.thread_id, "message_id": turn.message_id,
            "assistant": answer.content, "tool_calls": answer.tool_calls,
            "usage": answer.usage, "saved": saved}


def _transaction_factory(app):
    """The transactions the chat service stores an outcome in when it cannot
    ride on this view's commit: each in an app context of its own (a stream
    settles after the request's is gone), committed when its block ends
    cleanly, rolled back otherwise."""
    @contextmanager
    def transaction():
        with app.app_context():
            yield db.session
            db.session.commit()
    return transaction
