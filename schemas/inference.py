"""The inference bodies (OpenAI's chat completions, completions, embeddings
and responses; Anthropic's messages): checked where we know the fields, the
rest passed on untouched."""
from marshmallow import INCLUDE, Schema, ValidationError, fields, validate, validates

from schemas.common import SamplingSchema, StrictBoolean, StrictInteger, StrictNumber


# A message as validate_messages checks it, for the OpenAPI document (the
# rest of a message passes on untouched).
MESSAGE_DOCUMENT = {"type": "object", "required": ["role"], "additionalProperties": True,
                    "properties": {"role": {"type": "string"}}}


class ChatCompletionSchema(SamplingSchema):
    model = fields.String()
    messages = fields.List(fields.Dict(), required=True, validate=validate.Length(min=1),
                           metadata={"openapi": {"items": MESSAGE_DOCUMENT}})
    stream = StrictBoolean()
    n = StrictInteger(allow_none=True)

    @validates("messages")
    def validate_messages(self, messages, **_):
        _roles(messages)


def _roles(messages):
    errors = {i: ["each message needs a string 'role'"] for i, m in enumerate(messages)
              if not isinstance(m.get("role"), str)}
    if errors:
        raise ValidationError(errors)


def _strings_or_tokens(value, what):
    """A string, a list of strings, a list of token ids, or a list of lists of
    token ids (OpenAI's `prompt` and `input`), not empty."""
    def tokens(item):
        return (isinstance(item, list) and bool(item)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in item))
    if isinstance(value, str) or tokens(value):
        return
    if isinstance(value, list) and value and all(isinstance(v, str) or tokens(v) for v in value):
        return
    raise ValidationError(f"Must be a string, a list of strings or a list of token ids ({what}), "
                          "not empty.")


class Passing(Schema):
    """`model` a string and `stream` a boolean; unknown fields pass on."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(required=True, validate=validate.Length(min=1))
    stream = StrictBoolean()


class TextCompletionSchema(SamplingSchema, Passing):
    prompt = fields.Raw(required=True)
    n = StrictInteger(allow_none=True)

    @validates("prompt")
    def validate_prompt(self, value, **_):
        _strings_or_tokens(value, "the prompt")


class EmbeddingSchema(Passing):
    input = fields.Raw(required=True)
    dimensions = StrictInteger(validate=validate.Range(min=1))

    @validates("input")
    def validate_input(self, value, **_):
        _strings_or_tokens(value, "the texts to embed")


class ResponseSchema(Passing):
    input = fields.Raw(required=True)
    instructions = fields.String(allow_none=True)
    temperature = StrictNumber(allow_none=True)
    max_output_tokens = StrictInteger(allow_none=True)

    @validates("input")
    def validate_input(self, value, **_):
        if isinstance(value, str) and value:
            return
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            return
        raise ValidationError("Must be a string or a list of input items (objects), not empty.")


class AnthropicMessagesSchema(Passing):
    messages = fields.List(fields.Dict(), required=True, validate=validate.Length(min=1))
    max_tokens = StrictInteger(validate=validate.Range(min=1))
    system = fields.Raw()
    temperature = StrictNumber()

    @validates("messages")
    def validate_messages(self, messages, **_):
        _roles(messages)

    @validates("system")
    def validate_system(self, value, **_):
        if not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(block, dict) for block in value)):
            raise ValidationError("Must be a string or a list of content blocks.")


chat_completion = ChatCompletionSchema()
# By endpoint (models.ENDPOINTS): what each route checks before relaying.
BODY_SCHEMAS = {"chat/completions": chat_completion, "completions": TextCompletionSchema(),
                "embeddings": EmbeddingSchema(), "responses": ResponseSchema(),
                "messages": AnthropicMessagesSchema()}
