"""An OpenAI chat-completions body: checked where we know the fields, the rest
passed on untouched."""
from marshmallow import INCLUDE, Schema, ValidationError, fields, validate, validates

from schemas.common import StrictBoolean, StrictInteger, StrictNumber


class ChatCompletionSchema(Schema):
    class Meta:
        unknown = INCLUDE

    model = fields.String()
    messages = fields.List(fields.Dict(), required=True, validate=validate.Length(min=1))
    stream = StrictBoolean()
    temperature = StrictNumber(allow_none=True)
    top_p = StrictNumber(allow_none=True)
    presence_penalty = StrictNumber(allow_none=True)
    frequency_penalty = StrictNumber(allow_none=True)
    max_tokens = StrictInteger(allow_none=True)
    max_completion_tokens = StrictInteger(allow_none=True)
    n = StrictInteger(allow_none=True)

    @validates("messages")
    def validate_messages(self, messages, **_):
        errors = {i: ["each message needs a string 'role'"] for i, m in enumerate(messages)
                  if not isinstance(m.get("role"), str)}
        if errors:
            raise ValidationError(errors)


chat_completion = ChatCompletionSchema()
