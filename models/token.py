from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.common import created_column, id_column, iso


class ApiToken(db.Model):
    """A bearer token. Only its SHA-256 is stored: tokens are 256-bit random."""

    __tablename__ = "api_token"

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    role: Mapped[str] = mapped_column(sa.String(16))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = created_column()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    def view(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "created_at": iso(self.created_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
        }


class PublisherSession(db.Model):
    __tablename__ = "publisher_session"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.ForeignKey("api_token.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = created_column()
    last_heartbeat_at: Mapped[datetime | None]
