import re

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from schemas.agent import Params
from schemas.common import Name, RelayedSchema, StrictBoolean, StrictInteger, StrictSchema
from schemas.llm import TIERS, MaxConcurrency
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


class ChunkSchema(RelayedSchema):
    data = fields.String(required=True)


class ChunksSchema(RelayedSchema):
    chunks = fields.List(fields.Nested(ChunkSchema), required=True)
    done = StrictBoolean(load_default=False)
    seq = StrictInteger(validate=validate.Range(min=0), load_default=None)


MAX_CHUNK_ENTRIES = 256
SSE_EVENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")


class ChunkList(fields.Field):
    """`[{data: string, event?: string}, ...]`, checked in one pass: the hot
    path of a stream carries thousands a second, and a nested schema per
    chunk costs ten times as much. Errors name the chunk's index and field,
    as a nested schema's would."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("Not a valid list.")
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
                errors[i] = {"event": ["must be 1-64 letters, digits, '_', '.', ':' or '-'"]}
        if errors:
            raise ValidationError(errors)
        return value


class SessionChunksEntrySchema(RelayedSchema):
    task_id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    chunks = ChunkList(required=True)
    done = StrictBoolean(load_default=False)
    seq = StrictInteger(validate=validate.Range(min=0), load_default=None)


class SessionChunksSchema(RelayedSchema):
    """`POST /publishers/<sid>/chunks`: the chunks of many streams of one session."""

    tasks = fields.List(fields.Nested(SessionChunksEntrySchema), required=True,
                        validate=validate.Length(max=MAX_CHUNK_ENTRIES))


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
