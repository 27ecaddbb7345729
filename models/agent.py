from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from extensions import db
from models.common import JSON, LifecycleMixin, created_column, id_column, iso, updated_column


class Project(db.Model):
    __tablename__ = "project"

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[datetime] = created_column()
    updated_at: Mapped[datetime] = updated_column()

    def view(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class Agent(LifecycleMixin, db.Model):
    __tablename__ = "agent"
    __table_args__ = (
        sa.Index("ix_agent_kind_status", "kind", "status"),
        sa.Index("ix_agent_provider_session_id", "provider_session_id"),
        sa.Index("ix_agent_llm_id", "llm_id"),
        # An agent runs on an LLM, or on a pool of the rows serving a model.
        sa.CheckConstraint("(llm_id IS NULL) <> (model IS NULL)", name="llm_or_model"),
    )

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    system_prompt: Mapped[str] = mapped_column(sa.Text, default="")
    llm_id: Mapped[str | None] = mapped_column(sa.ForeignKey("llm.id", ondelete="RESTRICT"))
    model: Mapped[str | None] = mapped_column(sa.String(200))  # a pool: `pool:<model>`
    project_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("project.id", ondelete="SET NULL"))
    default_personality_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("personality.id", ondelete="SET NULL", use_alter=True))
    proxy_model_name: Mapped[str | None] = mapped_column(sa.String(200))
    default_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    extras: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    owner: Mapped[str | None] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = created_column()
    updated_at: Mapped[datetime] = updated_column()

    llm = relationship("Llm", lazy="joined")
    project = relationship("Project", lazy="joined")
    default_personality = relationship(
        "Personality", foreign_keys=[default_personality_id], lazy="joined", post_update=True)

    def view(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "system_prompt": self.system_prompt,
            "llm": self.llm.name if self.llm else None,
            "model": self.model,
            "project": self.project.name if self.project else None,
            "default_personality": (
                self.default_personality.name if self.default_personality else None),
            "proxy_model_name": self.proxy_model_name,
            "default_params": self.default_params or {},
            "extras": self.extras or {},
            **self.lifecycle_view(),
            "owner": self.owner,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class Personality(db.Model):
    """A named bundle of prompts, per agent, applied in `position` order."""

    __tablename__ = "personality"
    __table_args__ = (sa.UniqueConstraint("agent_id", "name"),)

    id: Mapped[str] = id_column()
    agent_id: Mapped[str] = mapped_column(sa.ForeignKey("agent.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(100))
    description: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[datetime] = created_column()
    updated_at: Mapped[datetime] = updated_column()

    # The DB cascades link rows when a personality or prompt goes.
    links = relationship("PersonalityPrompt", order_by="PersonalityPrompt.position",
                         cascade="all, delete-orphan", passive_deletes=True, lazy="selectin")

    @property
    def prompts(self) -> list["Prompt"]:
        return [link.prompt for link in self.links]

    def view(self, agent_name: str) -> dict:
        return {
            "id": self.id,
            "agent": agent_name,
            "name": self.name,
            "description": self.description,
            "prompts": [{"name": p.name, "scope": p.scope} for p in self.prompts],
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


_GLOBAL = "project_id IS NULL AND agent_id IS NULL"


class Prompt(db.Model):
    """Global (no project, no agent), per project, or per agent; a name is
    unique within its scope."""

    __tablename__ = "prompt"
    __table_args__ = (
        sa.Index("ix_prompt_project_id", "project_id"),
        sa.Index("ix_prompt_agent_id", "agent_id"),
        # NULLs are distinct in a unique index, hence one partial index per scope.
        sa.Index("uq_prompt_global_name", "name", unique=True,
                 sqlite_where=sa.text(_GLOBAL), postgresql_where=sa.text(_GLOBAL)),
        sa.Index("uq_prompt_project_id_name", "project_id", "name", unique=True,
                 sqlite_where=sa.text("project_id IS NOT NULL"),
                 postgresql_where=sa.text("project_id IS NOT NULL")),
        sa.Index("uq_prompt_agent_id_name", "agent_id", "name", unique=True,
                 sqlite_where=sa.text("agent_id IS NOT NULL"),
                 postgresql_where=sa.text("agent_id IS NOT NULL")),
    )

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(sa.String(100))
    content: Mapped[str] = mapped_column(sa.Text, default="")
    project_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("project.id", ondelete="CASCADE"))
    agent_id: Mapped[str | None] = mapped_column(sa.ForeignKey("agent.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = created_column()
    updated_at: Mapped[datetime] = updated_column()

    @property
    def scope(self) -> str:
        if self.agent_id:
            return "agent"
        return "project" if self.project_id else "global"

    def view(self, scope_name: str | None = None) -> dict:
        """`scope_name`: the project's or agent's name, when the prompt has one."""
        return {
            "id": self.id,
            "name": self.name,
            "content": self.content,
            "scope": self.scope,
            "project": scope_name if self.project_id else None,
            "agent": scope_name if self.agent_id else None,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class PersonalityPrompt(db.Model):
    __tablename__ = "personality_prompt"

    personality_id: Mapped[str] = mapped_column(
        sa.ForeignKey("personality.id", ondelete="CASCADE"), primary_key=True)
    prompt_id: Mapped[str] = mapped_column(
        sa.ForeignKey("prompt.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(default=0)

    prompt = relationship("Prompt", lazy="joined")
