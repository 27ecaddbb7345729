"""The status page's login form."""
from marshmallow import Schema, fields, validate


class LoginFormSchema(Schema):
    """`token=<an admin token>` (form-encoded); nothing else."""

    class Meta:
        unknown = "raise"

    token = fields.String(required=True, validate=validate.Length(min=1, max=512))


login_form = LoginFormSchema()
