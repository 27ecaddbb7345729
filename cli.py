"""`flask tokens ...` and `flask gc-sweep`."""
import click
from flask import current_app
from flask.cli import AppGroup

from extensions import db
from models import Role, utcnow
from services import tokens
from services.errors import ServiceError

tokens_cli = AppGroup("tokens", help="Create, list and revoke API tokens.")


@tokens_cli.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]))
def create_token(name, role):
    """Create a token and print it alone on stdout (it is never shown again)."""
    raw = _run(tokens.create_token, db.session, name, role)
    db.session.commit()
    click.echo(raw)


@tokens_cli.command("list")
def list_tokens():
    """List tokens (never the tokens themselves)."""
    for token in tokens.list_tokens(db.session):
        view = token.view()
        state = f"revoked {view['revoked_at']}" if token.revoked_at else "active"
        click.echo(f"{view['name']}\t{view['role']}\t{state}\t"
                   f"last used {view['last_used_at'] or 'never'}")


@tokens_cli.command("revoke")
@click.argument("name")
def revoke_token(name):
    """Revoke a token by name; requests with it then get 401."""
    _run(tokens.revoke_token, db.session, name, utcnow())
    db.session.commit()
    click.echo(f"revoked {name}", err=True)


@tokens_cli.command("bootstrap")
def bootstrap_token():
    """Create and print an admin token named `admin` if no admin token exists."""
    if tokens.has_active_admin(db.session):
        return
    raw = _run(tokens.create_token, db.session, "admin", Role.ADMIN)
    db.session.commit()
    click.echo(raw)


def _run(operation, *args):
    try:
        return operation(*args)
    except ServiceError as exc:
        raise click.ClickException(exc.message) from None


def init_app(app):
    app.cli.add_command(tokens_cli)
