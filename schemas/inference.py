"""An OpenAI chat-completions body: checked where we know the fields, the rest
passed on untouched."""
from marshmallow import ValidationError, fields, validate, validates

from schemas.common import SamplingSchema, StrictBoolean, StrictInteger


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
        errors = {i: ["each message needs a string 'role'"] for i, m in enumerate(messages)
                  if not isinstance(m.get("role"), str)}
        if errors:
            raise ValidationError(errors)


chat_completion = ChatCompletionSchema()
