"""`flask tokens create|list|revoke|bootstrap`."""
import sqlalchemy as sa

from extensions import db
from models import ApiToken


def invoke(runner, *args):
    return runner.invoke(args=list(args))


def test_create_prints_the_token_alone_on_stdout(runner, client):
    result = invoke(runner, "tokens", "create", "ci", "--role", "client")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert token.startswith("sb_") and len(token) > 40
    assert client.get("/api/v1/llms", headers={"Authorization": f"Bearer {token}"}
                      ).status_code == 200


def test_create_gives_the_token_its_role(runner, client):
    token = invoke(runner, "tokens", "create", "pub", "--role", "publisher").stdout.strip()
    response = client.post("/api/v1/llms", json={}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403


def test_create_with_a_taken_name_fails_without_printing_a_token(runner):
    invoke(runner, "tokens", "create", "ci", "--role", "client")
    result = invoke(runner, "tokens", "create", "ci", "--role", "admin")
    assert result.exit_code != 0
    assert result.stdout == ""
    assert "taken" in result.stderr


def test_create_rejects_an_unknown_role(runner):
    result = invoke(runner, "tokens", "create", "ci", "--role", "root")
    assert result.exit_code != 0
    assert result.stdout == ""


def test_list_shows_names_roles_and_states_but_never_tokens(runner):
    token = invoke(runner, "tokens", "create", "ci", "--role", "client").stdout.strip()
    invoke(runner, "tokens", "create", "old", "--role", "admin")
    invoke(runner, "tokens", "revoke", "old")
    result = invoke(runner, "tokens", "list")
    assert result.exit_code == 0
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    assert lines["ci"].startswith("client\tactive")
    assert lines["old"].startswith("admin\trevoked ")
    assert token not in result.output


def test_revoke_makes_the_token_401(runner, client):
    token = invoke(runner, "tokens", "create", "ci", "--role", "client").stdout.strip()
    result = invoke(runner, "tokens", "revoke", "ci")
    assert result.exit_code == 0
    response = client.get("/api/v1/llms", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401


def test_revoke_of_an_unknown_name_fails(runner):
    result = invoke(runner, "tokens", "revoke", "ghost")
    assert result.exit_code != 0
    assert "ghost" in result.stderr


def test_bootstrap_prints_an_admin_token_only_the_first_time(runner, client):
    first = invoke(runner, "tokens", "bootstrap")
    second = invoke(runner, "tokens", "bootstrap")
    assert first.exit_code == second.exit_code == 0
    token = first.stdout.strip()
    assert token.startswith("sb_")
    assert second.stdout == ""
    response = client.post("/api/v1/llms", headers={"Authorization": f"Bearer {token}"},
                           json={"name": "x", "model": "m", "url": "http://127.0.0.1:9/v1"})
    assert response.status_code == 201


def test_bootstrap_prints_nothing_when_an_admin_token_exists(runner):
    invoke(runner, "tokens", "create", "ops", "--role", "admin")
    result = invoke(runner, "tokens", "bootstrap")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_bootstrap_after_the_admin_token_was_revoked_makes_a_new_one(app, runner):
    invoke(runner, "tokens", "bootstrap")
    invoke(runner, "tokens", "revoke", "admin")
    result = invoke(runner, "tokens", "bootstrap")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("sb_")
    with app.app_context():
        active = db.session.scalars(sa.select(ApiToken.name).where(
            ApiToken.role == "admin", ApiToken.revoked_at.is_(None))).all()
    assert len(active) == 1


def test_tokens_help_lists_every_command_with_its_summary(runner):
    result = invoke(runner, "tokens", "--help")
    assert "Create, list, revoke and bootstrap API tokens." in result.output
    for line in ("bootstrap  Print a new admin token if none is active.",
                 "create     Create a token and print it alone on stdout.",
                 "list       List tokens (never the tokens themselves).",
                 "revoke     Revoke a token by name."):
        assert line in result.output


def test_create_help_says_what_each_role_may_do(runner):
    output = " ".join(invoke(runner, "tokens", "create", "--help").output.split())
    assert "What the token may do: admin (everything), publisher (publish LLMs and agents " \
           "and answer their tasks), client (list and call LLMs, chat with agents)." in output


def test_list_starts_with_a_header(runner):
    invoke(runner, "tokens", "create", "ci", "--role", "client")
    lines = invoke(runner, "tokens", "list").stdout.splitlines()
    assert lines[0] == "NAME\tROLE\tSTATE\tCREATED\tLAST USED"
    name, role, state, created, last_used = lines[1].split("\t")
    assert (name, role, state, last_used) == ("ci", "client", "active", "never")
    assert created.endswith("Z")
