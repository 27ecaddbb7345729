from marshmallow import ValidationError, fields, validate

from models import DEFAULT_ENDPOINT, ENDPOINTS
from schemas.common import HttpUrl, Name, StrictInteger, StrictSchema

LLM_TYPES = ("openai",)
TIERS = ("fast", "heavy")


def MaxConcurrency(**kwargs):
    """Requests in flight at once, 1-1024; null: no server-side cap."""
    return StrictInteger(allow_none=True, validate=validate.Range(min=1, max=1024), **kwargs)


def _unique(values):
    if len(set(values)) != len(values):
        raise ValidationError("Each endpoint may be listed once.")


def Endpoints(**kwargs):
    """The endpoints the backend serves: 1-5 of ENDPOINTS, each once."""
    return fields.List(fields.String(validate=validate.OneOf(ENDPOINTS)),
                       validate=[validate.Length(min=1, max=len(ENDPOINTS)), _unique], **kwargs)


class LlmCreateSchema(StrictSchema):
    name = Name(required=True)
    type = fields.String(load_default="openai", validate=validate.OneOf(LLM_TYPES))
    model = fields.String(required=True, validate=validate.Length(min=1, max=200))
    url = HttpUrl(required=True)
    tier = fields.String(load_default="fast", validate=validate.OneOf(TIERS))
    description = fields.String(load_default="", validate=validate.Length(max=10_000))
    api_key = fields.String(load_default=None, allow_none=True, load_only=True,
                            validate=validate.Length(max=10_000))
    extra_config = fields.Dict(keys=fields.String(), load_default=dict)
    max_concurrency = MaxConcurrency(load_default=None)
    endpoints = Endpoints(load_default=lambda: [DEFAULT_ENDPOINT])


class LlmUpdateSchema(StrictSchema):
    type = fields.String(validate=validate.OneOf(LLM_TYPES))
    model = fields.String(validate=validate.Length(min=1, max=200))
    url = HttpUrl()
    tier = fields.String(validate=validate.OneOf(TIERS))
    description = fields.String(validate=validate.Length(max=10_000))
    api_key = fields.String(allow_none=True, load_only=True, validate=validate.Length(max=10_000))
    extra_config = fields.Dict(keys=fields.String())
    max_concurrency = MaxConcurrency()
    endpoints = Endpoints()
    version = StrictInteger()


llm_create = LlmCreateSchema()
llm_update = LlmUpdateSchema()
