"""Column helpers and the lifecycle vocabulary shared by the models."""
import enum
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

# JSON columns: JSONB on PostgreSQL (binary, indexable, compared by value;
# it cannot hold \u0000, which the schemas refuse anyway), JSON text elsewhere.
JSON = sa.JSON().with_variant(JSONB(), "postgresql")

# The inference endpoints an LLM may serve (its `endpoints`), as the paths
# under /v1 that clients call and that a backend serves under its URL.
ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "messages")
DEFAULT_ENDPOINT = "chat/completions"


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """Naive UTC: the same on SQLite and PostgreSQL `timestamp` columns."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat(timespec="milliseconds") + "Z"


class Kind(enum.StrEnum):
    PUBLIC = "public"
    VIRTUAL = "virtual"


class Status(enum.StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    HIBERNATING = "hibernating"


class Role(enum.StrEnum):
    ADMIN = "admin"
    PUBLISHER = "publisher"
    CLIENT = "client"


def id_column() -> Mapped[str]:
    return mapped_column(sa.String(32), primary_key=True, default=new_id)


def created_column() -> Mapped[datetime]:
    return mapped_column(default=utcnow)


def updated_column() -> Mapped[datetime]:
    return mapped_column(default=utcnow, onupdate=utcnow)


class LifecycleMixin:
    """The columns a publishable row (LLM, agent) carries; see DESIGN.md Lifecycle."""

    kind: Mapped[str] = mapped_column(sa.String(16), default=Kind.PUBLIC)
    provider_session_id: Mapped[str | None] = mapped_column(sa.String(64))
    last_heartbeat_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(sa.String(16), default=Status.ACTIVE)
    inactive_since: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(default=1)

    @declared_attr.directive
    def __mapper_args__(cls):
        # Optimistic concurrency: every ORM UPDATE checks and bumps `version`.
        return {"version_id_col": cls.__table__.c.version}

    def lifecycle_view(self) -> dict:
        return {
            "kind": self.kind,
            "status": self.status,
            "provider_session_id": self.provider_session_id,
            "last_heartbeat_at": iso(self.last_heartbeat_at),
            "inactive_since": iso(self.inactive_since),
            "version": self.version,
        }
