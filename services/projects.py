"""Projects: named groups of agents and prompts. Services flush; views commit."""
import logging

import sqlalchemy as sa

from models import Project
from services import rows

log = logging.getLogger(__name__)


def list_projects(session) -> list[Project]:
    return list(session.scalars(sa.select(Project).order_by(Project.name)))


def get_project(session, name: str) -> Project:
    """The project called `name`. Raises NotFound."""
    return rows.get_by_name(session, Project, name, "Project")


def create_project(session, data: dict) -> Project:
    """Insert a project. Raises Conflict when the name is taken."""
    project = Project(**data)
    session.add(project)
    rows.flush_or_conflict(session, f"Project name '{data['name']}' is taken")
    log.info("created project %s", project.name)
    return project


def update_project(session, name: str, data: dict) -> Project:
    """Apply a partial update. Raises NotFound."""
    project = get_project(session, name)
    for key, value in data.items():
        setattr(project, key, value)
    session.flush()
    return project


def delete_project(session, name: str) -> None:
    """Delete a project: its agents stay (their project becomes null), its
    prompts go (and with them their places in personalities). Raises NotFound."""
    session.delete(get_project(session, name))
    session.flush()
    log.info("deleted project %s", name)

