from datetime import UTC

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validates_schema


class UtcDateTime(fields.AwareDateTime):
    """An ISO 8601 time with a zone (`Z` or an offset; none is UTC), as the
    naive UTC the columns hold."""

    def __init__(self, **kwargs):
        super().__init__(format="iso", default_timezone=UTC, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).astimezone(UTC).replace(
            tzinfo=None)


class UsageQuerySchema(Schema):
    """`?since=<ISO>&until=<ISO>` (both optional: the last 24 hours until now)."""

    class Meta:
        unknown = EXCLUDE

    since = UtcDateTime()
    until = UtcDateTime()

    @validates_schema
    def _ordered(self, data, **kwargs):
        if "since" in data and "until" in data and data["since"] > data["until"]:
            raise ValidationError("must not be after until", "since")


usage_query = UsageQuerySchema()
