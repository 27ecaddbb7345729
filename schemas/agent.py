"""Request bodies of agents, projects, prompts, personalities, threads and chat."""
from marshmallow import ValidationError, fields, validate, validates_schema

from schemas.common import (Name, NoNulSchema, SamplingSchema, StrictBoolean, StrictInteger,
                            StrictSchema)

TEXT_MAX = 100_000
# Keys of a chat-completions body that the chat builds itself.
RESERVED_PARAMS = ("model", "messages", "stream")


class SamplingParamsSchema(NoNulSchema, SamplingSchema):
    """`default_params` / `params`: the sampling fields (and `top_k`, which
    local servers take); a `null` in a call's `params` removes the agent's
    default for that key. The chat sets model, messages and stream itself."""

    top_k = StrictInteger(allow_none=True)

    @validates_schema(pass_original=True)
    def no_reserved_keys(self, _data, original, **_):
        reserved = [key for key in RESERVED_PARAMS if key in original]
        if reserved:
            raise ValidationError({key: ["Set by the chat; not a parameter."]
                                   for key in reserved})


def Params(**kwargs):
    return fields.Nested(SamplingParamsSchema, **kwargs)


def PoolModel(**kwargs):
    """The model of a pool (`pool:<model>`): any model name a row may serve."""
    return fields.String(validate=validate.Length(min=1, max=200), **kwargs)


class LlmOrModel:
    """An agent runs on an LLM (`llm`) or on a pool (`model`), not both."""

    @validates_schema
    def llm_or_model(self, data, partial=None, **_):
        given = [key for key in ("llm", "model") if data.get(key) is not None]
        if len(given) > 1:
            raise ValidationError("give either llm or model (a pool), not both", "_schema")
        if not given and not partial and not self.updating:
            raise ValidationError("give llm, or model (a pool)", "_schema")


class AgentCreateSchema(LlmOrModel, StrictSchema):
    updating = False
    name = Name(required=True)
    llm = Name()
    model = PoolModel()
    description = fields.String(load_default="", validate=validate.Length(max=10_000))
    system_prompt = fields.String(load_default="", validate=validate.Length(max=TEXT_MAX))
    project = Name(load_default=None, allow_none=True)
    default_personality = Name(load_default=None, allow_none=True)
    proxy_model_name = fields.String(load_default=None, allow_none=True,
                                     validate=validate.Length(max=200))
    default_params = Params(load_default=dict)
    extras = fields.Dict(keys=fields.String(), load_default=dict)


class AgentUpdateSchema(LlmOrModel, StrictSchema):
    updating = True
    llm = Name()
    model = PoolModel()
    description = fields.String(validate=validate.Length(max=10_000))
    system_prompt = fields.String(validate=validate.Length(max=TEXT_MAX))
    project = Name(allow_none=True)
    default_personality = Name(allow_none=True)
    proxy_model_name = fields.String(allow_none=True, validate=validate.Length(max=200))
    default_params = Params()
    extras = fields.Dict(keys=fields.String())
    version = StrictInteger()


class ProjectCreateSchema(StrictSchema):
    name = Name(required=True)
    description = fields.String(load_default="", validate=validate.Length(max=10_000))


class ProjectUpdateSchema(StrictSchema):
    description = fields.String(validate=validate.Length(max=10_000))


class PromptCreateSchema(StrictSchema):
    name = Name(required=True)
    content = fields.String(required=True, validate=validate.Length(max=TEXT_MAX))


class PromptUpdateSchema(StrictSchema):
    content = fields.String(validate=validate.Length(max=TEXT_MAX))


class PersonalityCreateSchema(StrictSchema):
    name = Name(required=True)
    description = fields.String(load_default="", validate=validate.Length(max=10_000))
    prompts = fields.List(Name(), load_default=list, validate=validate.Length(max=100))


class PersonalityUpdateSchema(StrictSchema):
    description = fields.String(validate=validate.Length(max=10_000))
    prompts = fields.List(Name(), validate=validate.Length(max=100))


class ThreadCreateSchema(StrictSchema):
    title = fields.String(load_default="", validate=validate.Length(max=200))


class ToolResultSchema(StrictSchema):
    tool_call_id = fields.String(required=True, validate=validate.Length(min=1, max=100))
    content = fields.String(required=True, validate=validate.Length(max=TEXT_MAX))


class ChatSchema(StrictSchema):
    message = fields.String(validate=validate.Length(min=1))
    # Answers to the tool calls of the thread's last assistant message.
    tool_results = fields.List(fields.Nested(ToolResultSchema),
                               validate=validate.Length(min=1, max=100))
    thread_id = fields.String(validate=validate.Length(min=1, max=32))
    personality = Name()
    params = Params(load_default=dict)
    stream = StrictBoolean(load_default=False)

    @validates_schema
    def message_or_tool_results(self, data, **_):
        if "message" not in data and "tool_results" not in data:
            raise ValidationError("Give a message, tool_results, or both.", "message")


agent_create = AgentCreateSchema()
agent_update = AgentUpdateSchema()
project_create = ProjectCreateSchema()
project_update = ProjectUpdateSchema()
prompt_create = PromptCreateSchema()
prompt_update = PromptUpdateSchema()
personality_create = PersonalityCreateSchema()
personality_update = PersonalityUpdateSchema()
thread_create = ThreadCreateSchema()
chat_request = ChatSchema()
