"""Log lines: text (the default) or one JSON object per line
(`SWITCHBOARD_LOG_FORMAT=json`), each carrying the request id of the request
it was written for. gunicorn.conf.py sets this up before the app is loaded,
for the app's loggers and for gunicorn's own."""
import logging
import sys

from gunicorn.glogging import Logger as _GunicornLogger

from services.request_ids import RequestIdFilter

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] [%(request_id)s] %(name)s: %(message)s"
TEXT_DATEFMT = "[%Y-%m-%d %H:%M:%S %z]"
# Fields of every JSON line; what a call passes in `extra` comes as fields too.
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(request_id)s %(message)s"
FORMATS = ("text", "json")
# Libraries that speak at INFO on every worker boot (alembic's plugins, read
# by the schema check) say only what is wrong.
QUIET_LOGGERS = ("alembic",)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level"},
                             datefmt="%Y-%m-%dT%H:%M:%S%z")
    return logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT)


def request_id_filter(log_format: str) -> RequestIdFilter:
    return RequestIdFilter(missing=None if log_format == "json" else "-")


def configure(log_format: str = "text", level: str = "info") -> None:
    """The root logger writes to stderr in `log_format` (`text` or `json`).
    Raises ValueError for another format."""
    log_format = (log_format or "text").lower()
    if log_format not in FORMATS:
        raise ValueError(f"SWITCHBOARD_LOG_FORMAT must be one of {', '.join(FORMATS)}, "
                         f"not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(request_id_filter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    GunicornLogger.log_format = log_format


class GunicornLogger(_GunicornLogger):
    """gunicorn's own lines (`gunicorn.error`, and its access log when
    ACCESS_LOG asks for one) in the same format as the app's."""

    log_format = "text"

    def setup(self, cfg):
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if log is self.error_log or self.log_format == "json":
                    handler.setFormatter(formatter(self.log_format))
                handler.addFilter(request_id_filter(self.log_format))
