"""orjson behind Flask's JSON provider: request bodies and views are the hot path."""
import orjson
from flask.json.provider import JSONProvider


# Validation errors key list positions by int.
OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(obj) -> bytes:
    return orjson.dumps(obj, option=OPTIONS)


loads = orjson.loads


class OrjsonProvider(JSONProvider):
    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj, option=OPTIONS).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj, option=OPTIONS),
                                        mimetype="application/json")
