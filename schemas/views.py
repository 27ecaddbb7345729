"""What the API answers, as marshmallow schemas: the OpenAPI document
(schemas/openapi.py) is generated from these and from the request schemas.

The views themselves are built by the models (`Llm.view()` ...); these
schemas describe them field for field, and the fuzzer test
(tests/test_openapi_fuzz.py) fails when an answer and its schema part ways.
"""
from marshmallow import INCLUDE, Schema, fields, validate

KINDS = ("public", "virtual")
STATUSES = ("active", "inactive", "hibernating")


def Text(**kwargs):
    return fields.String(required=True, **kwargs)


def Nullable(field_class, **kwargs):
    return field_class(required=True, allow_none=True, **kwargs)


def Time(**kwargs):
    return fields.DateTime(required=True, **kwargs)


class ErrorBodySchema(Schema):
    message = Text()
    type = Text()
    code = Text()
    details = fields.Dict(required=True)


class ErrorSchema(Schema):
    """Every error: OpenAI's shape, so OpenAI SDKs show the message."""

    error = fields.Nested(ErrorBodySchema, required=True)


class AnthropicErrorBodySchema(Schema):
    type = Text()
    message = Text()


class AnthropicErrorSchema(Schema):
    """Errors on /v1/messages: Anthropic's shape, so its SDKs show the message."""

    type = Text(validate=validate.Equal("error"))
    error = fields.Nested(AnthropicErrorBodySchema, required=True)


class LifecycleFields(Schema):
    kind = Text(validate=validate.OneOf(KINDS))
    status = Text(validate=validate.OneOf(STATUSES))
    provider_session_id = Nullable(fields.String)
    last_heartbeat_at = Nullable(fields.DateTime)
    inactive_since = Nullable(fields.DateTime)
    version = fields.Integer(required=True)


class LlmViewSchema(LifecycleFields):
    id = Text()
    name = Text()
    type = Text()
    model = Text()
    url = Text()
    tier = Text()
    description = Text()
    extra_config = fields.Dict(required=True)
    max_concurrency = Nullable(fields.Integer)
    endpoints = fields.List(fields.String(), required=True,
                            metadata={"description": "the endpoints its backend serves"})
    has_api_key = fields.Boolean(required=True)
    created_at = Time()
    updated_at = Time()


class AgentViewSchema(LifecycleFields):
    id = Text()
    name = Text()
    description = Text()
    system_prompt = Text()
    llm = Nullable(fields.String, metadata={"description": "the LLM's name (or null: a pool)"})
    model = Nullable(fields.String, metadata={"description": "the pool's model (or null)"})
    project = Nullable(fields.String)
    default_personality = Nullable(fields.String)
    proxy_model_name = Nullable(fields.String)
    default_params = fields.Dict(required=True)
    extras = fields.Dict(required=True)
    owner = Nullable(fields.String)
    created_at = Time()
    updated_at = Time()


class ProjectViewSchema(Schema):
    id = Text()
    name = Text()
    description = Text()
    created_at = Time()
    updated_at = Time()


class PromptViewSchema(Schema):
    id = Text()
    name = Text()
    content = Text()
    scope = Text(validate=validate.OneOf(("global", "project", "agent")))
    project = Nullable(fields.String)
    agent = Nullable(fields.String)
    created_at = Time()
    updated_at = Time()


class PromptRefSchema(Schema):
    name = Text()
    scope = Text(validate=validate.OneOf(("global", "project", "agent")))


class PersonalityViewSchema(Schema):
    id = Text()
    agent = Text()
    name = Text()
    description = Text()
    prompts = fields.List(fields.Nested(PromptRefSchema), required=True)
    created_at = Time()
    updated_at = Time()


class ThreadViewSchema(Schema):
    id = Text()
    agent_id = Text()
    owner = Text()
    title = Text()
    created_at = Time()
    last_turn_at = Nullable(fields.DateTime)


class MessageViewSchema(Schema):
    id = Text()
    thread_id = Text()
    turn_index = fields.Integer(required=True)
    role = Text()
    content = Text()
    tool_calls = Nullable(fields.List, cls_or_instance=fields.Dict())
    tool_call_id = Nullable(fields.String)
    status = Text(validate=validate.OneOf(("pending", "complete", "error")))
    error = Nullable(fields.String)
    created_at = Time()


class ChatAnswerSchema(Schema):
    """A non-streamed chat turn (streamed: SSE events, see the description)."""

    thread_id = Text()
    message_id = Text()
    assistant = Nullable(fields.String)
    tool_calls = Nullable(fields.List, cls_or_instance=fields.Dict())
    usage = Nullable(fields.Dict)
    saved = fields.Boolean(required=True)


class RegisteredSchema(Schema):
    session_id = Text()
    llms = fields.List(fields.Nested(LlmViewSchema), required=True)
    agents = fields.List(fields.Nested(AgentViewSchema), required=True)


class TaskSchema(Schema):
    """One task for the publisher: `infer` (with `body`, `streaming`), `wake`
    or `cancel`. Fields may be added; a publisher ignores what it does not know."""

    class Meta:
        unknown = INCLUDE

    kind = Text(validate=validate.OneOf(("infer", "wake", "cancel")))
    task_id = Text()
    llm = fields.String()
    streaming = fields.Boolean()
    body = fields.Dict()
    attempt = fields.Integer()


class TasksSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema), required=True)


class OkSchema(Schema):
    ok = fields.Boolean(required=True)


class AcceptedSchema(Schema):
    accepted = fields.Boolean(required=True)


class ModelSchema(Schema):
    id = Text(metadata={"description": "an LLM's name, `agent:<name>` or `pool:<model>`"})
    object = Text(validate=validate.Equal("model"))
    created = fields.Integer(required=True)
    owned_by = Text()


class ModelListSchema(Schema):
    object = Text(validate=validate.Equal("list"))
    data = fields.List(fields.Nested(ModelSchema), required=True)


class CompletionSchema(Schema):
    """The backend's chat.completion (or its own error), passed on as it is."""

    class Meta:
        unknown = INCLUDE


class UsageRowSchema(Schema):
    """One token's use of one LLM over the asked period."""

    token = Text(metadata={"description": "the token's name"})
    llm = Text()
    requests = fields.Integer(required=True, metadata={"description": "failures included"})
    errors = fields.Integer(required=True)
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    estimated = fields.Boolean(required=True, metadata={
        "description": "true when a count was estimated from a stream's chunks"})


class ChunkErrorSchema(Schema):
    status = fields.Integer(required=True)
    code = Text()
    message = Text()


class ChunkResultSchema(Schema):
    """One entry's outcome: `accepted`, or the error its own POST would get."""

    task_id = Text()
    accepted = fields.Boolean()
    error = fields.Nested(ChunkErrorSchema)


class ChunkResultsSchema(Schema):
    results = fields.List(fields.Nested(ChunkResultSchema), required=True)
