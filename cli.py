"""`flask tokens ...` and `flask gc-sweep`."""
import functools
import json

import click
import sqlalchemy as sa
from flask import current_app
from flask.cli import AppGroup, with_appcontext

from extensions import db
from models import Role, utcnow
from services import database, gc, tokens
from services.errors import ServiceError

tokens_cli = AppGroup("tokens", help="Create, list, revoke and bootstrap API tokens.")

ROLE_HELP = ("What the token may do: admin (everything), publisher (publish LLMs and agents "
             "and answer their tasks), client (list and call LLMs, chat with agents).")


def migrated(command):
    """Refuse, saying what to do, on a database `flask db upgrade` has not built."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        problem = current_app.extensions["schema_check"].problem(db.session.connection())
        if problem is not None:
            raise click.ClickException(problem)
        return command(*args, **kwargs)
    return wrapper


@tokens_cli.command("create", short_help="Create a token and print it alone on stdout.")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice([r.value for r in Role]),
              help=ROLE_HELP)
@migrated
def create_token(name, role):
    """Create a token and print it alone on stdout (it is never shown again)."""
    raw = _run(tokens.create_token, db.session, name, role)
    _commit()
    click.echo(raw)


@tokens_cli.command("list", short_help="List tokens (never the tokens themselves).")
@migrated
def list_tokens():
    """List tokens, tab-separated under a header (never the tokens themselves)."""
    click.echo("NAME\tROLE\tSTATE\tCREATED\tLAST USED")
    for token in tokens.list_tokens(db.session):
        view = token.view()
        state = f"revoked {view['revoked_at']}" if token.revoked_at else "active"
        click.echo(f"{view['name']}\t{view['role']}\t{state}\t{view['created_at']}\t"
                   f"{view['last_used_at'] or 'never'}")


@tokens_cli.command("revoke", short_help="Revoke a token by name.")
@click.argument("name")
@migrated
def revoke_token(name):
    """Revoke a token by name; requests with it then get 401."""
    _run(tokens.revoke_token, db.session, name, utcnow())
    _commit()
    click.echo(f"revoked {name}", err=True)


@tokens_cli.command("bootstrap", short_help="Print a new admin token if none is active.")
@migrated
def bootstrap_token():
    """Print a new admin token if there is no active one (`make run` does this).

    The token is named `admin` (`admin-2`, ... when a revoked token holds the
    name); with an active admin token it prints nothing."""
    raw = _run(tokens.bootstrap_admin, db.session)
    if raw is not None:
        _commit()
        click.echo(raw)


def _run(operation, *args):
    """The operation's result; a refusal, or a database that is busy or
    unreachable, is a one-line error (exit 1), not a traceback."""
    try:
        return operation(*args)
    except ServiceError as exc:
        raise click.ClickException(exc.message) from None
    except sa.exc.SQLAlchemyError as exc:
        error = database.unavailable(exc)
        if error is None:
            raise
        raise click.ClickException(f"{error.message} ({error.code})") from None


def _commit():
    _run(db.session.commit)


@click.command("gc-sweep")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on one line.")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds without heartbeat before a virtual row goes inactive "
                   "(default: SWITCHBOARD_HEARTBEAT_TIMEOUT, 90).")
@click.option("--retention", type=click.FloatRange(min=0), default=None,
              help="Seconds an inactive virtual row is kept before deletion "
                   "(default: SWITCHBOARD_INACTIVE_RETENTION, 14400).")
@with_appcontext
@migrated
def gc_sweep(as_json, heartbeat_timeout, retention):
    """Sweep virtual LLMs and agents: stale → inactive, long inactive → deleted;
    settle chat answers a killed worker left pending."""
    config = current_app.config
    interrupted_after = float(config["CHAT_PENDING_TIMEOUT"])

    def sweep():
        # Its own, longer bounds: at 100,000 rows a statement may outlast the
        # server's statement_timeout.
        with database.maintenance_bounds(db.session.connection(), config):
            result = gc.sweep(
                db.session, utcnow(),
                heartbeat_timeout=(heartbeat_timeout if heartbeat_timeout is not None
                                   else float(config["HEARTBEAT_TIMEOUT"])),
                retention=(retention if retention is not None
                           else float(config["INACTIVE_RETENTION"])),
                interrupted_after=interrupted_after)
            db.session.commit()
        return result

    result = _run(sweep)
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":")))
        return
    if result.get("skipped"):
        click.echo("another gc-sweep is running: nothing done")
        return
    for table in ("agents", "llms"):
        counts = result[table]
        click.echo(f"{table}: {counts['marked_inactive']} marked inactive, "
                   f"{counts['deleted']} deleted")
    click.echo(f"chat messages: {result['chat_messages']['settled']} interrupted "
               f"turns settled as error")


def init_app(app):
    app.cli.add_command(tokens_cli)
    app.cli.add_command(gc_sweep)
