"""One exception root for the publisher client: catch PublisherError."""


class PublisherError(Exception):
    """Anything the publisher client raises on purpose."""


class ConfigError(PublisherError):
    """The config file is unreadable or invalid. The message is one line."""


class ServerError(PublisherError):
    """The Switchboard server answered with an error status."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnavailable(ServerError):
    """The server could not be reached, timed out or answered 5xx: retry later."""


class SessionNotFound(ServerError):
    """The server does not know our session (restart, GC): register again."""


class TaskGone(ServerError):
    """The task was cancelled, expired or is unknown: stop working on it."""


class TaskFailure(PublisherError):
    """A task failed. str() is short and generic: it is posted to the server
    and reaches clients (502 messages, chat history). `detail` holds what only
    the local log may see: backend URLs, wake commands, their stderr."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


class BackendUnavailable(TaskFailure):
    """The local LLM backend could not be reached, or broke off its answer."""


class WakeError(TaskFailure):
    """A wake recipe failed, or the backend did not come up in time."""
