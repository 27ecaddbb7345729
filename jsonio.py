"""orjson behind Flask's JSON provider: request bodies and views are the hot path."""
import json

import orjson
from flask.json.provider import JSONProvider


# Validation errors key list positions by int.
OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(obj) -> bytes:
    try:
        return orjson.dumps(obj, option=OPTIONS)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
        # PostgreSQL's JSONB gives a stored 1e300 back as a 301-digit integer,
        # which orjson does not write: the standard library does.
        return json.dumps(obj, separators=(",", ":")).encode()


loads = orjson.loads


class OrjsonProvider(JSONProvider):
    def dumps(self, obj, **kwargs) -> str:
        return dumps(obj).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(dumps(obj), mimetype="application/json")
