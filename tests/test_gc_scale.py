"""gc-sweep over 100,000 rows: right counts, and a handful of statements
(set-based), not a query per row. Its speed is measured by bench/, not here."""
from datetime import timedelta

import sqlalchemy as sa

from extensions import db
from models import Llm, new_id, utcnow
from services import gc

ROWS = 100_000


def insert_llms(now, count, prefix, **fields):
    db.session.execute(sa.insert(Llm), [
        {"id": new_id(), "name": f"{prefix}-{i}", "model": "m", "url": "", "type": "openai",
         "tier": "fast", "description": "", "extra_config": {}, "version": 1,
         "created_at": now, "updated_at": now, **fields}
        for i in range(count)])


def test_sweep_of_100k_rows_is_a_few_statements_with_exact_counts(app):
    now = utcnow()
    with app.app_context():
        virtual = {"kind": "virtual", "provider_session_id": "s"}
        insert_llms(now, 40_000, "stale", status="active",
                    last_heartbeat_at=now - timedelta(minutes=5), **virtual)
        insert_llms(now, 10_000, "stale-asleep", status="hibernating",
                    last_heartbeat_at=now - timedelta(minutes=5), **virtual)
        insert_llms(now, 25_000, "expired", status="inactive",
                    last_heartbeat_at=now - timedelta(hours=6),
                    inactive_since=now - timedelta(hours=5), **virtual)
        insert_llms(now, 15_000, "fresh", status="active", last_heartbeat_at=now, **virtual)
        insert_llms(now, 10_000, "public", kind="public", status="active",
                    last_heartbeat_at=now - timedelta(days=3))
        db.session.commit()

        statements = []
        sa.event.listen(db.engine, "before_cursor_execute",
                        lambda *args: statements.append(args[2]))
        first = gc.sweep(db.session, now, heartbeat_timeout=90, retention=4 * 3600)
        db.session.commit()
        second = gc.sweep(db.session, now, heartbeat_timeout=90, retention=4 * 3600)
        db.session.commit()

        assert first["llms"] == {"marked_inactive": 50_000, "deleted": 25_000}
        assert (second["marked_inactive"], second["deleted"]) == (0, 0)
        assert len(statements) <= 2 * 8
        counts = dict(db.session.execute(
            sa.select(Llm.status, sa.func.count()).group_by(Llm.status)).all())
        assert counts == {"inactive": 50_000, "active": 25_000}
