"""Chat with agents in persistent threads.

A turn has three steps, and the view owns the transaction around each:

1. `start_turn` stores the caller's message (and tool results) and a
   `pending` assistant message, and says what to run; the view commits and
   lets go of its connection;
2. `complete_turn` / `stream_turn` run the body on the relay (public upstream
   or publisher), holding no database connection, and turn its reply into an
   `Answer` (`read_completion` / `read_stream`);
3. `finish_turn` stores the answer `complete`, or `fail_turn` stores the
   message `error` with what arrived. Nothing is ever half-written `complete`.
   The outcome is stored through the view's `transaction`, a factory of
   context managers, each yielding a session and committing it when its
   block ends cleanly, and is retried a few times while the database is
   busy (another process, a cron `gc-sweep`, holding SQLite's write lock or
   PostgreSQL's row locks past `lock_timeout`; services/database.py decides):
   the answer is paid for, so a short wait beats losing it. An answer that
   still cannot be stored is reported as such (`saved` false; an `error`
   event instead of `final`), and its message stays `pending` until the
   sweep settles it.

The context of a turn is the agent's system text (system prompt + the
personality's prompts), the thread's complete messages in order, and the
new message, with each run of user messages joined into one (a failed turn
leaves its user message unanswered, and chat templates such as Mistral's
demand that user and assistant alternate); its params are the agent's
`default_params` overlaid by the call's `params` (a `null` removes a default).
"""
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from jsonio import dumps
from models import Agent, ChatMessage, ChatThread, MessageStatus, Status
from services import agents, database, inference, rows
from services.errors import (BadGateway, Forbidden, Invalid, NotFound, ServiceError, Unavailable,
                            envelope)
from services.inference import SSE_KEEPALIVE, Reply, Route, sse_event

log = logging.getLogger(__name__)

TITLE_LENGTH = 80
# Upstream statuses that say something about the request itself; any other
# failure is the upstream's, a 502 for our caller.
PASSED_THROUGH = {400: "invalid_request_error", 413: "invalid_request_error",
                  422: "invalid_request_error", 429: "rate_limit_error"}
CLIENT_GONE = "The client went away before the answer finished"
INTERRUPTED = "The turn was interrupted before the answer finished"
NOT_SAVED = "The answer could not be saved to the thread; it is not part of its history"
# Storing an outcome while the database is busy: this many attempts, each
# waiting up to SQLITE_BUSY_TIMEOUT (a wait that stalls the gevent worker,
# hence few) or PostgreSQL's DATABASE_LOCK_TIMEOUT for the lock, with a
# cooperative sleep between them of SETTLE_BACKOFF seconds, doubling, with
# jitter.
SETTLE_ATTEMPTS = 3
SETTLE_BACKOFF = 0.5

# A new transaction each call: a session, committed when the block ends cleanly.
Transaction = Callable[[], AbstractContextManager[Session]]
Clock = Callable[[], datetime]


class InferenceFailed(ServiceError):
    """The LLM answered, but not with a usable completion."""

    def __init__(self, message, *, status=BadGateway.status, type_=BadGateway.type,
                 code="inference_failed", details=None):
        super().__init__(message, code=code, details=details)
        self.status = status
        self.type = type_


@dataclass(frozen=True)
class Turn:
    """What `start_turn` stored, and what to run."""

    thread_id: str
    message_id: str  # the assistant's pending message
    route: Route
    body: dict
    token: str  # the caller: its turn in a fair queue

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


@dataclass
class Answer:
    """An assistant message as it arrives: whole, or accumulated from chunks."""

    content: str = ""
    tool_calls: list | None = None
    usage: dict | None = None
    finished: bool = False
    _calls: dict = field(default_factory=dict, repr=False)

    def add_chunk(self, chunk: dict) -> str:
        """Fold one chat.completion.chunk in; returns its text delta."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                self._add_call_delta(call)
            if choice.get("finish_reason"):
                self.finished = True
        self.content += "".join(text)
        return "".join(text)

    def _add_call_delta(self, delta):
        # Strings arrive in pieces and are concatenated, like the openai SDK does.
        call = self._calls.setdefault(delta.get("index", len(self._calls)), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = delta.get("id") or call["id"]
        call["type"] = delta.get("type") or call["type"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
        self.tool_calls = [self._calls[i] for i in sorted(self._calls)]


# -- threads -----------------------------------------------------------------

def list_threads(session, agent_name: str, caller) -> list[ChatThread]:
    """The caller's threads with the agent (every thread for an admin), most
    recent first. Raises NotFound."""
    agent = agents.get_agent(session, agent_name)
    query = sa.select(ChatThread).where(ChatThread.agent_id == agent.id)
    if not caller.is_admin:
        query = query.where(ChatThread.owner == caller.id)
    recent = sa.func.coalesce(ChatThread.last_turn_at, ChatThread.created_at)
    return list(session.scalars(query.order_by(recent.desc(), ChatThread.id)))


def create_thread(session, agent_name: str, caller, title: str, now) -> ChatThread:
    """A new thread with the agent, owned by the caller. Raises NotFound."""
    return _new_thread(session, agents.get_agent(session, agent_name), caller, title, now)


def get_thread(session, thread_id: str, caller) -> ChatThread:
    """The thread, if the caller owns it or is an admin. Raises NotFound, Forbidden."""
    thread = session.get(ChatThread, thread_id)
    if thread is None:
        raise NotFound(f"Thread '{thread_id}' not found", code="thread_not_found")
    if thread.owner != caller.id and not caller.is_admin:
        raise Forbidden(f"Thread '{thread_id}' belongs to another token",
                        code="foreign_thread")
    return thread


def list_messages(session, thread_id: str, caller) -> list[ChatMessage]:
    """Every message of the thread in turn order. Raises NotFound, Forbidden."""
    thread = get_thread(session, thread_id, caller)
    return list(session.scalars(sa.select(ChatMessage).where(
        ChatMessage.thread_id == thread.id).order_by(ChatMessage.turn_index)))


def delete_thread(session, thread_id: str, caller) -> None:
    """Delete the thread and its messages. Raises NotFound, Forbidden."""
    session.delete(get_thread(session, thread_id, caller))
    session.flush()


# -- a turn ------------------------------------------------------------------

def start_turn(session, agent_name: str, caller, request: dict, now, is_live) -> Turn:
    """Store the caller's message (after any tool results) and a pending
    assistant message in the thread (a new one without `thread_id`), and
    build the body to run. Raises NotFound (agent, thread, personality),
    Forbidden (another token's thread), Unavailable (inactive agent or LLM),
    Invalid (tool results without a thread; tool results that do not answer
    each unanswered tool call of the thread's last complete assistant
    message exactly once, or a message without them while such calls wait),
    Conflict (a concurrent turn took the same place in the thread). A row
    known to be inactive (agent or LLM) is refused here, before anything is
    stored: there is no turn to record. `is_live(session_id)` tells a live
    publisher (an agent on a pool runs on its members that can answer)."""
    agent = agents.get_usable_agent(session, agent_name)
    system, defaults = agents.persona(session, agent, request.get("personality"))
    route = inference.route(session, agents.runs_on(agent), is_live)
    if route.pool is None and route.targets[0].status == Status.INACTIVE:
        raise Unavailable(f"Virtual LLM '{route.queue}' is inactive; publisher offline",
                          code="publisher_offline")
    thread = _thread_for_turn(session, agent, caller, request, now)

    history = list(session.scalars(
        sa.select(ChatMessage)
        .where(ChatMessage.thread_id == thread.id, ChatMessage.status == MessageStatus.COMPLETE)
        .order_by(ChatMessage.turn_index)))
    _check_tool_results(thread, _unanswered_calls(history), request.get("tool_results", ()))
    index = session.scalar(sa.select(sa.func.max(ChatMessage.turn_index))
                           .where(ChatMessage.thread_id == thread.id))
    index = -1 if index is None else index
    new = [ChatMessage(role="tool", content=result["content"],
                       tool_call_id=result["tool_call_id"])
           for result in request.get("tool_results", ())]
    if "message" in request:
        new.append(ChatMessage(role="user", content=request["message"]))
    new.append(ChatMessage(role="assistant", content="", status=MessageStatus.PENDING))
    for message in new:
        index += 1
        message.thread_id, message.turn_index = thread.id, index
        message.status = message.status or MessageStatus.COMPLETE
        session.add(message)
    thread.last_turn_at = now
    rows.flush_or_conflict(session, f"Thread '{thread.id}' has another turn starting; retry",
                           code="turn_conflict")

    messages = [{"role": "system", "content": system}] if system else []
    messages += _alternating([_context_message(m) for m in history + new[:-1]])
    params = {key: value for key, value in {**defaults, **request.get("params", {})}.items()
              if value is not None}
    body = {**params, "messages": messages, "stream": bool(request.get("stream"))}
    return Turn(thread_id=thread.id, message_id=new[-1].id, route=route, body=body,
                token=caller.id)


def finish_turn(session, turn: Turn, answer: Answer, now) -> bool:
    """Store the answer on the pending assistant message, `complete`. Returns
    False when the message was no longer pending (the sweep settled it)."""
    return _settle(session, turn, now, status=MessageStatus.COMPLETE, content=answer.content,
                   tool_calls=answer.tool_calls)


def fail_turn(session, turn: Turn, error: str, now, partial: str = "") -> bool:
    """Mark the pending assistant message `error`, with what had arrived.
    Returns False when the message was no longer pending."""
    return _settle(session, turn, now, status=MessageStatus.ERROR, content=partial, error=error)


def complete_turn(relay, turn: Turn, transaction: Transaction, clock: Clock,
                  client_connected=None) -> tuple[Answer, bool]:
    """Run a non-streamed turn on the relay and store its answer `complete` in
    a `transaction` of its own. Returns the answer and whether it was saved:
    an answer the database would not take (busy past every retry) is still
    the caller's. A failure is stored `error`, then raised: InferenceFailed
    (400/413/422/429 as the upstream said, else 502), or the relay's errors
    (Unavailable, Timeout, BadGateway, ClientGone when `client_connected()`
    says the client left while a publisher worked ...)."""
    _reply, answer = _run(relay, turn, transaction, clock, client_connected)
    return answer, _store(transaction, finish_turn, turn, answer, clock=clock)


def stream_turn(relay, turn: Turn, transaction: Transaction, clock: Clock) -> Iterator[bytes]:
    """Run a streamed turn on the relay and return the chat's server-sent
    events: `text` deltas, then `final` (or `error`, with the envelope). The
    outcome is stored in a `transaction` of its own when the stream settles:
    `complete`, or `error` with what had arrived (also when the consumer
    closes the events early). An answer that could not be stored ends with
    an `error` event (code `answer_not_saved`) carrying its `tool_calls` and
    `usage`, not `final`. A failure before the stream starts is stored and
    raised as `complete_turn` does."""
    reply, answer = _run(relay, turn, transaction, clock)
    return _events(turn, reply, answer, transaction, clock)


# -- reading the relay's reply --------------------------------------------------

def read_completion(llm: str, reply: Reply) -> Answer:
    """The answer of a non-streamed reply (a chat.completion). Raises
    InferenceFailed: 400/413/422/429 as the upstream said, else 502."""
    if not 200 <= reply.status < 300:
        raise rejection(llm, reply)
    body = _json(reply.body)
    try:
        message = body["choices"][0]["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise InferenceFailed(f"LLM '{llm}' answered {reply.status} without a choice",
                              code="no_choice") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return Answer(content=content if isinstance(content, str) else "",
                  tool_calls=message.get("tool_calls") or None,
                  usage=body.get("usage"), finished=True)


def read_stream(llm: str, reply: Reply, answer: Answer) -> Iterator[str | None]:
    """Yield the text deltas of a streamed reply as they arrive (None for a
    keep-alive), folding every chunk into `answer`. Raises InferenceFailed when
    the stream carries an error or ends before it finished."""
    for payload in sse_payloads(reply.stream):
        if payload is None:
            yield None
            continue
        if payload.strip() == "[DONE]":
            answer.finished = True
            return
        chunk = _json(payload)
        if not isinstance(chunk, dict):
            raise InferenceFailed(f"LLM '{llm}' streamed something that is not a chunk",
                                  code="bad_chunk")
        if "error" in chunk:
            raise _stream_error(llm, chunk["error"])
        delta = answer.add_chunk(chunk)
        if delta:
            yield delta
    if not answer.finished:
        raise InferenceFailed(f"The stream of LLM '{llm}' ended before the answer finished",
                              code="stream_incomplete")


def sse_payloads(chunks: Iterable[bytes]) -> Iterator[str | None]:
    """The `data` of each server-sent event in a byte stream (None for an
    event with no data: a keep-alive comment)."""
    buffer = b""
    for chunk in chunks:
        buffer = (buffer + chunk).replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            yield _event_data(event)
    if buffer.strip():
        yield _event_data(buffer)


def rejection(llm: str, reply: Reply) -> InferenceFailed:
    """The error for a non-2xx reply, carrying the upstream's status and message."""
    message = _error_message(reply.body) or "no message"
    type_ = PASSED_THROUGH.get(reply.status)
    return InferenceFailed(
        f"LLM '{llm}' answered {reply.status}: {message}",
        status=reply.status if type_ else BadGateway.status, type_=type_ or BadGateway.type,
        code="upstream_rejected" if type_ else "upstream_error",
        details={"upstream_status": reply.status})


# -- internals ----------------------------------------------------------------

def _run(relay, turn, transaction, clock, client_connected=None):
    """The relay's reply, and its answer when it came whole (else None)."""
    try:
        reply = relay.infer(turn.route, turn.body, client_connected=client_connected,
                            token=turn.token)
        answer = None if reply.stream is not None else read_completion(turn.route.queue, reply)
    except ServiceError as exc:
        _store(transaction, fail_turn, turn, exc.message, clock=clock)
        raise
    except Exception:
        _store(transaction, fail_turn, turn, "Internal error", clock=clock)
        raise
    except BaseException:  # GreenletExit, gevent.Timeout: settle, then let it stop us
        _store(transaction, fail_turn, turn, INTERRUPTED, clock=clock)
        raise
    return reply, answer


def _events(turn, reply, answer, transaction, clock):
    if answer is not None:  # the backend answered whole although asked to stream
        deltas = [answer.content] if answer.content else []
    else:
        answer = Answer()
        deltas = read_stream(turn.route.queue, reply, answer)
    try:
        for delta in deltas:
            yield SSE_KEEPALIVE if delta is None else _event({"type": "text", "delta": delta})
    except ServiceError as exc:
        _store(transaction, fail_turn, turn, exc.message, partial=answer.content, clock=clock)
        yield _event({"type": "error", **envelope(exc.message, exc.type, exc.code),
                      "thread_id": turn.thread_id, "message_id": turn.message_id})
        return
    except GeneratorExit:
        _store(transaction, fail_turn, turn, CLIENT_GONE, partial=answer.content, clock=clock)
        raise
    except Exception:
        log.exception("chat stream of thread %s failed", turn.thread_id)
        _store(transaction, fail_turn, turn, "Internal error", partial=answer.content,
               clock=clock)
        yield _event({"type": "error", **envelope("Internal server error", "server_error",
                                                  "internal_error"),
                      "thread_id": turn.thread_id, "message_id": turn.message_id})
        return
    except BaseException:  # GreenletExit, gevent.Timeout: settle, then let it stop us
        _store(transaction, fail_turn, turn, INTERRUPTED, partial=answer.content, clock=clock)
        raise
    finally:
        if reply.stream is not None:
            reply.stream.close()  # releases the bus task, or the upstream connection
    outcome = {"thread_id": turn.thread_id, "message_id": turn.message_id,
               "tool_calls": answer.tool_calls, "usage": answer.usage}
    if _store(transaction, finish_turn, turn, answer, clock=clock):
        yield _event({"type": "final", **outcome})
    else:  # the text went out already; say it is not in the thread
        yield _event({"type": "error", **envelope(NOT_SAVED, Unavailable.type,
                                                  "answer_not_saved"), **outcome})


def _event(payload) -> bytes:
    return sse_event(dumps(payload))


def _store(transaction, settle, turn, *args, clock, **kwargs) -> bool:
    """Settle the turn in a transaction of its own, retried while the
    database is busy; returns whether the message moved. A failure is
    logged: the message then stays `pending` (the sweep's to settle), never
    wrong."""
    for attempt in range(1, SETTLE_ATTEMPTS + 1):
        try:
            with transaction() as session:
                return settle(session, turn, *args, now=clock(), **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            if not database.is_busy(exc) or attempt == SETTLE_ATTEMPTS:
                database.log_unexpected(
                    exc, f"could not store the outcome of thread {turn.thread_id}")
                return False
            log.warning("database busy storing the outcome of thread %s (attempt %d of %d)",
                        turn.thread_id, attempt, SETTLE_ATTEMPTS)
        except Exception:
            log.exception("could not store the outcome of thread %s", turn.thread_id)
            return False
        # Cooperative under gevent (monkey-patched): the worker serves others meanwhile.
        time.sleep(SETTLE_BACKOFF * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
    return False



def _new_thread(session, agent: Agent, caller, title: str, now) -> ChatThread:
    thread = ChatThread(agent_id=agent.id, owner=caller.id, title=title, created_at=now)
    session.add(thread)
    session.flush()
    return thread


def _thread_for_turn(session, agent, caller, request, now):
    if "thread_id" not in request:
        if "tool_results" in request:
            raise Invalid("tool_results answer a thread's tool calls: give its thread_id",
                          code="validation_failed",
                          details={"thread_id": ["Required with tool_results."]})
        title = " ".join(request["message"].split())[:TITLE_LENGTH]
        return _new_thread(session, agent, caller, title, now)
    thread = get_thread(session, request["thread_id"], caller)
    if thread.agent_id != agent.id:
        raise NotFound(f"Thread '{thread.id}' not found for agent '{agent.name}'",
                       code="thread_not_found")
    return thread


def _unanswered_calls(history: list[ChatMessage]) -> list[str]:
    """The ids of the tool calls of the last assistant message in `history`
    that no later tool message answers."""
    for position in range(len(history) - 1, -1, -1):
        if history[position].role == "assistant":
            answered = {m.tool_call_id for m in history[position + 1:] if m.role == "tool"}
            return [call["id"] for call in history[position].tool_calls or ()
                    if call.get("id") and call["id"] not in answered]
    return []


def _check_tool_results(thread, pending: list[str], results) -> None:
    """Tool results must answer each pending call exactly once: an
    OpenAI-style upstream rejects a context with an unanswered call, or an
    answer to no call, on this turn and on every later one."""
    given = [result["tool_call_id"] for result in results]
    if not pending:
        if given:
            raise Invalid(f"Thread '{thread.id}' has no tool calls waiting for results: "
                          f"unknown {', '.join(sorted(set(given)))}",
                          code="tool_results_mismatch", details={"unknown": sorted(set(given))})
        return
    if not given:
        raise Invalid(f"Thread '{thread.id}' waits for the results of tool calls "
                      f"{', '.join(pending)}: give tool_results",
                      code="tool_results_required", details={"missing": pending})
    problems = {
        "missing": [call for call in pending if call not in given],
        "unknown": sorted({call for call in given if call not in pending}),
        "duplicate": sorted({call for call in given if given.count(call) > 1} & set(pending)),
    }
    problems = {kind: calls for kind, calls in problems.items() if calls}
    if problems:
        named = "; ".join(f"{kind} {', '.join(calls)}" for kind, calls in problems.items())
        raise Invalid(f"tool_results must answer each tool call waiting in thread "
                      f"'{thread.id}' ({', '.join(pending)}) once: {named}",
                      code="tool_results_mismatch", details=problems)


def _context_message(message: ChatMessage) -> dict:
    out = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
        out["content"] = message.content or None
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _alternating(messages: list[dict]) -> list[dict]:
    """The messages with each run of user messages joined by a blank line."""
    joined = []
    for message in messages:
        if joined and message["role"] == "user" and joined[-1]["role"] == "user":
            joined[-1] = {**joined[-1],
                          "content": f"{joined[-1]['content']}\n\n{message['content']}"}
        else:
            joined.append(message)
    return joined


def _settle(session, turn, now, **values):
    # Only a pending message moves: a settled one is never rewritten. What the
    # LLM (or a publisher's error) said is stored without NUL characters,
    # which PostgreSQL cannot hold; the caller got it as it was.
    changed = session.execute(
        sa.update(ChatMessage)
        .where(ChatMessage.id == turn.message_id, ChatMessage.status == MessageStatus.PENDING)
        .values(**database.without_nul(values))
        .execution_options(synchronize_session=False)).rowcount
    session.execute(sa.update(ChatThread).where(ChatThread.id == turn.thread_id)
                    .values(last_turn_at=now).execution_options(synchronize_session=False))
    if not changed:
        log.warning("assistant message %s was no longer pending", turn.message_id)
        return False
    log.info("turn of thread %s settled %s", turn.thread_id, values["status"])
    return True


def _event_data(event: bytes) -> str | None:
    data = [line[5:].removeprefix(b" ") for line in event.split(b"\n")
            if line.startswith(b"data:")]
    return b"\n".join(data).decode("utf-8", "replace") if data else None


def _json(body):
    if isinstance(body, bytes | str):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    return body


def _error_message(body) -> str:
    parsed = _json(body)
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("message"))
        if isinstance(error, dict):
            error = error.get("message")
        if error:
            return str(error)[:500]
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return body.strip()[:500] if isinstance(body, str) else ""


def _stream_error(llm, error):
    """An error event in the stream (the relay's envelope, or the upstream's)."""
    if isinstance(error, dict):
        return InferenceFailed(str(error.get("message") or f"LLM '{llm}' stream failed"),
                               type_=error.get("type") or BadGateway.type,
                               code=error.get("code") or "stream_error")
    return InferenceFailed(f"LLM '{llm}' stream failed: {error}", code="stream_error")
