"""What the registry services share: the lookup by name, the flush that turns
a unique-name violation into a 409, and optimistic concurrency on `version`.

A flush that fails leaves the session to be rolled back by whoever owns the
transaction: the view (or CLI command), or the app context's teardown when the
error is raised through it."""
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from services import database
from services.errors import Conflict, NotFound


def get_by_name(session, model, name: str, label: str):
    """The `model` row called `name`. Raises NotFound ("<label> '<name>' not found")."""
    row = session.scalar(sa.select(model).where(model.name == name))
    if row is None:
        raise NotFound(f"{label} '{name}' not found",
                       code=f"{label.lower().replace(' ', '_')}_not_found")
    return row


def flush_or_conflict(session, message: str, code: str = "name_taken") -> None:
    """Flush; a unique or foreign key violation (the row another transaction
    inserted, or still references) becomes a Conflict. Other constraint
    failures are bugs, and go on."""
    with conflict_on_race(message, code):
        session.flush()


@contextmanager
def conflict_on_race(message: str, code: str):
    """Within the block, losing a race to another transaction is a Conflict:
    a unique or foreign key violation when the block flushes (explicitly or
    by autoflush), or a versioned row another transaction changed first."""
    try:
        yield
    except IntegrityError as exc:
        if database.is_unique_violation(exc) or database.is_foreign_key_violation(exc):
            raise Conflict(message, code=code) from None
        raise
    except StaleDataError:
        raise Conflict(message, code=code) from None


def check_version(row, expected: int | None, label: str) -> None:
    """With `expected` (a PATCH's `version`), the row must still be at it.
    Raises Conflict."""
    if expected is not None and expected != row.version:
        raise Conflict(f"{label} '{row.name}' is at version {row.version}, not {expected}",
                       code="version_conflict", details={"version": row.version})


def flush_versioned(session, row, label: str) -> None:
    """Flush an update; a concurrent one that won the race is a Conflict."""
    # The name as it was read: once the flush fails, the row cannot load anything
    # until the transaction's owner rolls back.
    name = (sa.inspect(row).attrs.name.history.deleted or [row.name])[0]
    try:
        session.flush()
    except StaleDataError:
        raise Conflict(f"{label} '{name}' was changed concurrently",
                       code="version_conflict") from None
