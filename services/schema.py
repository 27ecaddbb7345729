"""Whether the database is migrated for this code: a database that was never
migrated (or is behind) answers 503 "run `flask db upgrade`" instead of a
bare 500 from the first query that meets a missing table."""
import logging

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from services.errors import Unavailable

log = logging.getLogger(__name__)

UPGRADE_HINT = "run `flask db upgrade`"


class SchemaCheck:
    """Asks the database until it once finds the schema current; from then
    on `require` costs nothing (a schema is not un-migrated under a running
    server)."""

    def __init__(self, migrations_directory: str):
        self.directory = migrations_directory
        self.current = False
        self._revisions = None

    def problem(self, connection) -> str | None:
        """What is wrong with the schema, or None when it is current (or
        ahead: a newer release migrated it, and this code's tables are still
        there). Database errors (unreachable, locked) propagate."""
        if self.current:
            return None
        heads, known = self._read_revisions()
        if not sa.inspect(connection).has_table("alembic_version"):
            return f"The database has no schema yet; {UPGRADE_HINT}"
        versions = set(connection.scalars(sa.text("SELECT version_num FROM alembic_version")))
        if not versions:
            return f"The database has no schema yet; {UPGRADE_HINT}"
        behind = (versions & known) - heads
        if behind:
            return (f"The database schema is at revision {', '.join(sorted(behind))}, behind "
                    f"this release's {', '.join(sorted(heads))}; {UPGRADE_HINT}")
        self.current = True
        return None

    def require(self, connection) -> None:
        """Raises Unavailable (503, `database_not_migrated`) unless current."""
        message = self.problem(connection)
        if message is not None:
            log.warning("refusing a request: %s", message)
            raise Unavailable(message, code="database_not_migrated",
                              headers={"Retry-After": "5"})

    def _read_revisions(self):
        if self._revisions is None:
            script = ScriptDirectory(self.directory)
            self._revisions = (set(script.get_heads()),
                               {rev.revision for rev in script.walk_revisions()})
        return self._revisions
