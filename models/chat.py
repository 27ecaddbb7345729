import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db
from models.common import JSON, created_column, id_column, iso


class MessageStatus(enum.StrEnum):
    PENDING = "pending"    # the assistant's answer is being produced
    COMPLETE = "complete"
    ERROR = "error"        # inference failed; never part of the context again


class ChatThread(db.Model):
    __tablename__ = "chat_thread"
    __table_args__ = (sa.Index("ix_chat_thread_agent_id_owner", "agent_id", "owner"),)

    id: Mapped[str] = id_column()
    agent_id: Mapped[str] = mapped_column(sa.ForeignKey("agent.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(sa.String(32))
    title: Mapped[str] = mapped_column(sa.String(200), default="")
    created_at: Mapped[datetime] = created_column()
    last_turn_at: Mapped[datetime | None]

    def view(self) -> dict:
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "owner": self.owner,
            "title": self.title,
            "created_at": iso(self.created_at),
            "last_turn_at": iso(self.last_turn_at),
        }


class ChatMessage(db.Model):
    __tablename__ = "chat_message"
    __table_args__ = (
        sa.UniqueConstraint("thread_id", "turn_index"),
        # gc-sweep settles answers left `pending` by a killed worker.
        sa.Index("ix_chat_message_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = id_column()
    thread_id: Mapped[str] = mapped_column(sa.ForeignKey("chat_thread.id", ondelete="CASCADE"))
    turn_index: Mapped[int]
    role: Mapped[str] = mapped_column(sa.String(16))
    content: Mapped[str] = mapped_column(sa.Text, default="")
    tool_calls: Mapped[list[Any] | None] = mapped_column(JSON)
    tool_call_id: Mapped[str | None] = mapped_column(sa.String(100))
    status: Mapped[str] = mapped_column(sa.String(16), default=MessageStatus.COMPLETE)
    # Why an assistant message ended in `error` (its content is what arrived).
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = created_column()

    def view(self) -> dict:
        return {
            "id": self.id,
            "thread_id": self.thread_id,
            "turn_index": self.turn_index,
            "role": self.role,
            "content": self.content,
            "tool_calls": self.tool_calls,
            "tool_call_id": self.tool_call_id,
            "status": self.status,
            "error": self.error,
            "created_at": iso(self.created_at),
        }
