from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from extensions import db


class UsageBucket(db.Model):
    """What one token spent on one LLM (or pool) in one time bucket
    (DESIGN.md, "Operations": usage). Rows are only ever added to (an upsert
    per flush); `llm` is a name, so the history outlives a deleted LLM."""

    __tablename__ = "usage_bucket"

    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    token_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("api_token.id", ondelete="CASCADE"), primary_key=True)
    llm: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    errors: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    # Whether any count in the row was estimated (a stream without `usage`).
    estimated: Mapped[bool] = mapped_column(default=False)
