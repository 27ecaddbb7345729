import re

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from schemas.agent import Params
from schemas.common import Name, RelayedSchema, StrictBoolean, StrictInteger, StrictSchema
from schemas.llm import TIERS, Endpoints, MaxConcurrency
from services.bus.base import MAX_ACKS_PER_POLL

SESSION_ID = validate.Regexp(r"^[A-Za-z0-9_-]{1,64}\Z",
                             error="must be 1-64 letters, digits, '-' or '_'")


class PublishedLlmSchema(StrictSchema):
    name = Name(required=True)
    type = fields.String(load_default="openai",
                         validate=validate.Regexp(r"^[a-z][a-z0-9_-]{0,31}\Z"))
    model = fields.String(required=True, validate=validate.Length(min=1, max=200))
    tier = fields.String(validate=validate.OneOf(TIERS))
    description = fields.String(validate=validate.Length(max=10_000))
    extra_config = fields.Dict(keys=fields.String())
    initial_status = fields.String(validate=validate.OneOf(("active", "hibernating")))
    max_concurrency = MaxConcurrency()
    endpoints = Endpoints()


class PublishedAgentSchema(StrictSchema):
    name = Name(required=True)
    llm = Name(required=True)
    description = fields.String(validate=validate.Length(max=10_000))
    system_prompt = fields.String(validate=validate.Length(max=200_000))
    project = Name(allow_none=True)
    default_params = Params()
    extras = fields.Dict(keys=fields.String())


class RegisterSchema(StrictSchema):
    session_id = fields.String(allow_none=True, load_default=None, validate=SESSION_ID)
    llms = fields.List(fields.Nested(PublishedLlmSchema), required=True,
                       validate=validate.Length(max=1000))
    agents = fields.List(fields.Nested(PublishedAgentSchema), load_default=list,
                         validate=validate.Length(max=1000))

    @validates_schema
    def names_are_unique(self, data, **_):
        for key in ("llms", "agents"):
            names = [item["name"] for item in data.get(key, [])]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValidationError(f"duplicate names: {', '.join(duplicates)}", key)


class ResultSchema(RelayedSchema):
    status = StrictInteger(validate=validate.Range(min=100, max=599))
    body = fields.Raw(allow_none=True)
    error = fields.String(validate=validate.Length(min=1, max=10_000))

    @validates_schema
    def one_outcome(self, data, **_):
        if ("error" in data) == ("status" in data):
            raise ValidationError("give either {status, body} or {error}", "_schema")


MAX_CHUNK_ENTRIES = 256
SSE_EVENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
SSE_EVENT_MESSAGE = "must be 1-64 letters, digits, '_', '.', ':' or '-'"


class ChunkSchema(RelayedSchema):
    """A chunk: its data, and the name of its SSE event (`event:` line), if any."""

    data = fields.String(required=True)
    event = fields.String(validate=validate.Regexp(SSE_EVENT, error=SSE_EVENT_MESSAGE))


class ChunksSchema(RelayedSchema):
    chunks = fields.List(fields.Nested(ChunkSchema), required=True)
    done = StrictBoolean(load_default=False)
    seq = StrictInteger(validate=validate.Range(min=0), load_default=None)


def _chunk_errors(value) -> dict | list | None:
    """What is wrong with `[{data: string, event?: string}, ...]`, as a
    nested schema would say it (by index and field), or None."""
    if not isinstance(value, list):
        return ["Not a valid list."]
    errors = {}
    for i, chunk in enumerate(value):
        if not isinstance(chunk, dict):
            errors[i] = {"_schema": ["Invalid input type."]}
        elif not isinstance(chunk.get("data"), str):
            errors[i] = {"data": ["Missing data for required field." if "data" not in chunk
                                  else "Not a valid string."]}
        elif len(chunk) > 1 and (unknown := set(chunk) - {"data", "event"}):
            errors[i] = {key: ["Unknown field."] for key in sorted(unknown)}
        elif "event" in chunk and not (isinstance(chunk["event"], str)
                                       and SSE_EVENT.match(chunk["event"])):
            errors[i] = {"event": [SSE_EVENT_MESSAGE]}
    return errors or None


def _entry_errors(entry) -> dict | None:
    """What is wrong with one `{task_id, chunks, seq?, done?}`, or None."""
    if not isinstance(entry, dict):
        return {"_schema": ["Invalid input type."]}
    errors = {}
    task_id = entry.get("task_id")
    if task_id is None:
        errors["task_id"] = ["Missing data for required field."]
    elif not isinstance(task_id, str) or not 1 <= len(task_id) <= 128:
        errors["task_id"] = ["Must be a string of 1 to 128 characters."]
    if "chunks" not in entry:
        errors["chunks"] = ["Missing data for required field."]
    elif (chunk_errors := _chunk_errors(entry["chunks"])) is not None:
        errors["chunks"] = chunk_errors
    seq = entry.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        errors["seq"] = ["Must be an integer greater than or equal to 0."]
    if "done" in entry and not isinstance(entry["done"], bool):
        errors["done"] = ["Not a valid boolean."]
    for key in set(entry) - {"task_id", "chunks", "seq", "done"}:
        errors[key] = ["Unknown field."]
    return errors or None


class ChunkEntries(fields.Field):
    """The entries of a session's chunk POST, `[{task_id, chunks: [{data,
    event?}], seq?, done?}, ...]`, checked in one pass: the hot path of many
    streams carries thousands of chunks a second, and a nested schema per
    entry and per chunk costs several times as much. Errors name the index
    and the field, as nested schemas would; `seq` defaults to None, `done`
    to false."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("Not a valid list.")
        if len(value) > MAX_CHUNK_ENTRIES:
            raise ValidationError(f"Longer than maximum length {MAX_CHUNK_ENTRIES}.")
        errors = {i: error for i, entry in enumerate(value)
                  if (error := _entry_errors(entry)) is not None}
        if errors:
            raise ValidationError(errors)
        return [{"task_id": entry["task_id"], "chunks": entry["chunks"],
                 "seq": entry.get("seq"), "done": entry.get("done", False)} for entry in value]


class SessionChunksSchema(RelayedSchema):
    """`POST /publishers/<sid>/chunks`: the chunks of many streams of one session."""

    tasks = ChunkEntries(required=True, metadata={"openapi": {
        "type": "array", "maxItems": MAX_CHUNK_ENTRIES, "items": {
            "type": "object", "required": ["task_id", "chunks"], "additionalProperties": False,
            "properties": {
                "task_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "chunks": {"type": "array", "items": {
                    "type": "object", "required": ["data"], "additionalProperties": False,
                    "properties": {"data": {"type": "string"},
                                   "event": {"type": "string",
                                             "pattern": SSE_EVENT.pattern.replace("\\Z", "$")}}}},
                "seq": {"type": "integer", "minimum": 0, "nullable": True},
                "done": {"type": "boolean"}}}}})


class CommaSeparated(fields.List):
    """A query parameter holding a comma-separated list ("" is the empty list)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("Not a valid comma-separated list.")
        items = [item for item in value.split(",") if item] if value else []
        return super()._deserialize(items, attr, data, **kwargs)


class PollQuerySchema(Schema):
    """`?wait=<seconds>&ack=<id>,<id>`: `ack` given (even empty) makes the
    session acknowledging (DESIGN.md, "Delivery"). Other parameters (a
    proxy's cache buster) are ignored."""

    class Meta:
        unknown = EXCLUDE

    wait = fields.Float(validate=validate.Range(min=0), allow_nan=False)
    ack = CommaSeparated(fields.String(validate=SESSION_ID),
                         validate=validate.Length(max=MAX_ACKS_PER_POLL))


register = RegisterSchema()
result = ResultSchema()
chunks = ChunksSchema()
session_chunks = SessionChunksSchema()
poll_query = PollQuerySchema()
