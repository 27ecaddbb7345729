"""orjson behind Flask's JSON provider: request bodies and views are the hot path."""
import orjson
from flask.json.provider import JSONProvider


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


loads = orjson.loads


class OrjsonProvider(JSONProvider):
    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s, **kwargs):
        return orjson.loads(s)

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj), mimetype="application/json")
