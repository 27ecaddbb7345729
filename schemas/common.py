import re
from urllib.parse import urlsplit

from marshmallow import INCLUDE, Schema, ValidationError, fields, pre_load, validate, validates

# \Z, not $: `$` also matches before a final newline ("abc\n" is no name).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
# Doubled braces: marshmallow formats this message with str.format.
NAME_MESSAGE = "must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}$"


def Name(**kwargs):
    return fields.String(validate=validate.Regexp(NAME_PATTERN, error=NAME_MESSAGE), **kwargs)


class StrictNumber(fields.Number):
    """A JSON number, not a numeric string and not a bool."""

    num_type = float

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError("Not a valid number.")
        return value


class StrictInteger(fields.Integer):
    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError("Not a valid integer.")
        return value


class StrictBoolean(fields.Boolean):
    """true or false, not 1 or 0 (`1 in {True}` holds in Python)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise ValidationError("Not a valid boolean.")
        return value


def _http_url(value):
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or any(c.isspace() for c in value)):
        raise ValidationError("Not a valid http(s) URL.")


def HttpUrl(**kwargs):
    """An http(s) URL whose host may be any name a resolver accepts: unlike
    marshmallow's Url, `http://gpu_box:8000/v1` (a compose service) is fine."""
    return fields.String(validate=[validate.Length(max=2000), _http_url], **kwargs)


class SamplingSchema(Schema):
    """OpenAI's sampling fields, typed where we know them; any other key
    (`response_format`, `logprobs`, vendor extras ...) passes on untouched."""

    class Meta:
        unknown = INCLUDE

    temperature = StrictNumber(allow_none=True)
    top_p = StrictNumber(allow_none=True)
    presence_penalty = StrictNumber(allow_none=True)
    frequency_penalty = StrictNumber(allow_none=True)
    max_tokens = StrictInteger(allow_none=True)
    max_completion_tokens = StrictInteger(allow_none=True)
    seed = StrictInteger(allow_none=True)
    stop = fields.Raw(allow_none=True)
    tools = fields.List(fields.Dict(), allow_none=True)

    @validates("stop")
    def validate_stop(self, value, **_):
        if value is None or isinstance(value, str):
            return
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValidationError("Must be a string or a list of strings.")


NUL_MESSAGE = "Must not contain NUL characters."
NUL_KEY_MESSAGE = "Keys must not contain NUL characters."


def nul_errors(value):
    """Marshmallow-shaped errors for every NUL character in `value`'s strings,
    keys included, at any depth ({} when there is none)."""
    if isinstance(value, str):
        return [NUL_MESSAGE] if "\x00" in value else {}
    if isinstance(value, dict):
        errors = {}
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                errors[key.replace("\x00", "\\u0000")] = [NUL_KEY_MESSAGE]
            elif problems := nul_errors(item):
                errors[key] = problems
        return errors
    if isinstance(value, list):
        return {index: problems for index, item in enumerate(value)
                if (problems := nul_errors(item))}
    return {}


class NoNulSchema(Schema):
    """A body that is stored: a NUL character anywhere in it is a 400 naming
    its field, on every engine (PostgreSQL's text and JSONB cannot hold one;
    SQLite would keep it and hand it on)."""

    @pre_load
    def refuse_nul(self, data, **_):
        if isinstance(data, dict) and (errors := nul_errors(data)):
            raise ValidationError(errors)
        return data


class StrictSchema(NoNulSchema):
    """Unknown fields are a 400: CRUD cannot set lifecycle columns. Such a
    body is stored, so NULs are refused too (NoNulSchema)."""

    class Meta:
        unknown = "raise"


class RelayedSchema(Schema):
    """Unknown fields are a 400, but this body is only relayed to a client,
    never stored (a task's result or chunks): its NULs go through, as an
    inference body's do."""

    class Meta:
        unknown = "raise"
