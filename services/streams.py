"""The publisher's side of streams: the chunks of many tasks of one session
in one POST (DESIGN.md, "Streams at a real model's pace")."""
from services.inference import bus_chunk


def push_task_chunks(bus, task_id: str, owner: str | None, entry: dict) -> None:
    """One task's chunks (`{chunks: [{data, event?}], seq, done}`: `POST
    /tasks/<id>/chunks`). Raises what the bus raises (409, 410, 404, 429, 503)."""
    bus.push_chunks(task_id, [bus_chunk(chunk["data"], chunk.get("event"))
                              for chunk in entry["chunks"]],
                    entry["seq"], entry["done"], owner=owner)


def push_session_chunks(bus, session_id: str, owner: str | None, entries: list) -> list[dict]:
    """Hand every entry (`{task_id, chunks: [{data, event?}], seq, done}`) of
    the session's POST to the bus in one call. Returns, per entry and in
    order, `{task_id, accepted: true}` or `{task_id, error: {status, code,
    message}}`: each entry follows every rule of `POST /tasks/<id>/chunks`
    (ownership, seq dedupe, [DONE] once, 409, 410), and a task of another
    session is a 403. The caller has checked the session itself. Raises
    Unavailable (the bus)."""
    if not entries:
        return []
    errors = bus.push_chunks_batch(session_id, [
        {"task_id": entry["task_id"], "seq": entry["seq"], "done": entry["done"],
         "chunks": [bus_chunk(chunk["data"], chunk.get("event")) for chunk in entry["chunks"]]}
        for entry in entries], owner=owner)
    return [{"task_id": entry["task_id"], "accepted": True} if error is None else
            {"task_id": entry["task_id"], "error": {"status": error["status"],
                                                    "code": error["code"],
                                                    "message": error["message"]}}
            for entry, error in zip(entries, errors, strict=True)]
