from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.common import (DEFAULT_ENDPOINT, JSON, LifecycleMixin, created_column, id_column,
                           iso, updated_column)


class Llm(LifecycleMixin, db.Model):
    __tablename__ = "llm"
    __table_args__ = (
        sa.Index("ix_llm_kind_status", "kind", "status"),
        sa.Index("ix_llm_provider_session_id", "provider_session_id"),
    )

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    type: Mapped[str] = mapped_column(sa.String(32), default="openai")
    model: Mapped[str] = mapped_column(sa.String(200))
    url: Mapped[str] = mapped_column(sa.String(2000), default="")
    tier: Mapped[str] = mapped_column(sa.String(16), default="fast")
    description: Mapped[str] = mapped_column(sa.Text, default="")
    # Write-only: no view, log line or error message may carry it.
    api_key: Mapped[str | None] = mapped_column(sa.Text)
    extra_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # At most this many requests in flight at once (None: no server-side cap).
    max_concurrency: Mapped[int | None]
    # What the backend serves, of services/inference.py's ENDPOINTS.
    endpoints: Mapped[list[str]] = mapped_column(
        JSON, default=lambda: [DEFAULT_ENDPOINT],
        server_default=sa.text(f"'[\"{DEFAULT_ENDPOINT}\"]'"))
    created_at: Mapped[datetime] = created_column()
    updated_at: Mapped[datetime] = updated_column()

    def __repr__(self) -> str:  # never the key
        return f"<Llm {self.name} {self.kind}/{self.status}>"

    def view(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "model": self.model,
            "url": self.url,
            "tier": self.tier,
            "description": self.description,
            "extra_config": self.extra_config or {},
            "max_concurrency": self.max_concurrency,
            "endpoints": list(self.endpoints or [DEFAULT_ENDPOINT]),
            **self.lifecycle_view(),
            "has_api_key": bool(self.api_key),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
