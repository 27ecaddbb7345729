"""Agents, projects, prompts and personalities through the HTTP API, on a real
SQLite database with its foreign keys on."""
import pytest

API = "/api/v1"


@pytest.fixture
def admin(client, auth):
    """admin(method, path, json=None) → response, with the admin token."""
    def call(method, path, json=None):
        return client.open(API + path, method=method, json=json, headers=auth("admin"))
    return call


@pytest.fixture
def llm(admin):
    response = admin("POST", "/llms", {"name": "up", "model": "gpt-x",
                                       "url": "http://upstream.test/v1"})
    assert response.status_code == 201, response.json
    return "up"


def make_agent(admin, name="reviewer", **fields):
    response = admin("POST", "/agents", {"name": name, "llm": "up", **fields})
    assert response.status_code == 201, response.json
    return response.json


# -- agents -------------------------------------------------------------------

def test_admin_creates_a_public_agent_pinned_to_an_llm(admin, llm):
    view = make_agent(admin, system_prompt="You review diffs.",
                      default_params={"temperature": 0.2, "stop": ["END"]})
    assert view["llm"] == "up"
    assert (view["kind"], view["status"], view["version"]) == ("public", "active", 1)
    assert view["system_prompt"] == "You review diffs."
    assert view["default_params"] == {"temperature": 0.2, "stop": ["END"]}
    assert view["owner"]
    assert admin("GET", "/agents/reviewer").json == view


def test_everyone_reads_agents_but_only_admin_writes(client, auth, admin, llm):
    make_agent(admin)
    for role in ("client", "publisher"):
        listed = client.get(f"{API}/agents", headers=auth(role))
        assert [a["name"] for a in listed.json] == ["reviewer"]
        refused = client.post(f"{API}/agents", headers=auth(role),
                              json={"name": "x", "llm": "up"})
        assert refused.status_code == 403


def test_agent_body_cannot_set_lifecycle_fields(admin, llm):
    response = admin("POST", "/agents", {"name": "a", "llm": "up", "kind": "virtual",
                                         "status": "inactive"})
    assert response.status_code == 400
    assert set(response.json["error"]["details"]) == {"kind", "status"}


def test_agent_name_outside_the_pattern_is_400(admin, llm):
    response = admin("POST", "/agents", {"name": "no spaces", "llm": "up"})
    assert response.status_code == 400
    assert "name" in response.json["error"]["details"]


def test_agent_on_an_unknown_llm_is_404(admin):
    response = admin("POST", "/agents", {"name": "a", "llm": "nope"})
    assert response.status_code == 404
    assert response.json["error"]["code"] == "llm_not_found"


def test_agent_name_taken_is_409(admin, llm):
    make_agent(admin)
    assert admin("POST", "/agents", {"name": "reviewer", "llm": "up"}).status_code == 409


def test_default_params_are_typed_and_cannot_set_messages(admin, llm):
    wrong_type = admin("POST", "/agents", {"name": "a", "llm": "up",
                                           "default_params": {"temperature": "hot"}})
    reserved = admin("POST", "/agents", {"name": "a", "llm": "up",
                                         "default_params": {"messages": []}})
    assert wrong_type.status_code == reserved.status_code == 400
    assert "default_params" in reserved.json["error"]["details"]


def test_default_params_pass_unknown_openai_fields_on(admin, llm):
    view = make_agent(admin, default_params={"response_format": {"type": "json_object"}})
    assert view["default_params"] == {"response_format": {"type": "json_object"}}


def test_patch_agent_with_a_stale_version_is_409(admin, llm):
    make_agent(admin)
    assert admin("PATCH", "/agents/reviewer", {"description": "v2", "version": 1}).json[
        "version"] == 2
    stale = admin("PATCH", "/agents/reviewer", {"description": "v3", "version": 1})
    assert stale.status_code == 409
    assert stale.json["error"]["code"] == "version_conflict"


def test_patch_agent_repins_the_llm_and_clears_the_project_with_null(admin, llm):
    admin("POST", "/projects", {"name": "proj"})
    admin("POST", "/llms", {"name": "other", "model": "m", "url": "http://o.test/v1"})
    make_agent(admin, project="proj")
    view = admin("PATCH", "/agents/reviewer", {"llm": "other", "project": None}).json
    assert (view["llm"], view["project"]) == ("other", None)


def test_deleting_an_llm_with_a_pinned_agent_is_409_until_the_agent_goes(admin, llm):
    make_agent(admin)
    refused = admin("DELETE", "/llms/up")
    assert refused.status_code == 409
    assert refused.json["error"]["details"] == {"agents": ["reviewer"]}
    assert admin("DELETE", "/agents/reviewer").status_code == 204
    assert admin("DELETE", "/llms/up").status_code == 204


def test_deleting_a_project_leaves_its_agents_without_one(admin, llm):
    admin("POST", "/projects", {"name": "proj"})
    make_agent(admin, project="proj")
    assert admin("DELETE", "/projects/proj").status_code == 204
    assert admin("GET", "/agents/reviewer").json["project"] is None


def test_deleting_an_agent_deletes_its_personalities_prompts_and_threads(
        client, auth, admin, llm):
    make_agent(admin)
    admin("POST", "/agents/reviewer/prompts", {"name": "p", "content": "c"})
    admin("POST", "/agents/reviewer/personalities", {"name": "calm", "prompts": ["p"]})
    thread = client.post(f"{API}/agents/reviewer/threads", json={}, headers=auth("client"))
    assert admin("DELETE", "/agents/reviewer").status_code == 204
    make_agent(admin)  # same name, a fresh agent
    assert admin("GET", "/agents/reviewer/prompts").json == []
    assert admin("GET", "/agents/reviewer/personalities").json == []
    assert admin("GET", f"/threads/{thread.json['id']}").status_code == 404


# -- projects -----------------------------------------------------------------

def test_project_crud(admin):
    created = admin("POST", "/projects", {"name": "proj", "description": "d"})
    assert created.status_code == 201
    assert admin("POST", "/projects", {"name": "proj"}).status_code == 409
    assert admin("PATCH", "/projects/proj", {"description": "e"}).json["description"] == "e"
    assert [p["name"] for p in admin("GET", "/projects").json] == ["proj"]
    assert admin("PATCH", "/projects/proj", {"name": "renamed"}).status_code == 400
    assert admin("DELETE", "/projects/proj").status_code == 204
    assert admin("GET", "/projects/proj").status_code == 404


# -- prompts ------------------------------------------------------------------

def test_prompt_names_are_unique_within_a_scope_not_across_scopes(admin, llm):
    admin("POST", "/projects", {"name": "proj"})
    make_agent(admin)
    for prefix in ("", "/projects/proj", "/agents/reviewer"):
        created = admin("POST", f"{prefix}/prompts", {"name": "tone", "content": prefix})
        assert created.status_code == 201, created.json
        again = admin("POST", f"{prefix}/prompts", {"name": "tone", "content": "x"})
        assert again.status_code == 409
    assert admin("GET", "/projects/proj/prompts/tone").json["scope"] == "project"
    assert admin("GET", "/agents/reviewer/prompts/tone").json["agent"] == "reviewer"
    assert [p["scope"] for p in admin("GET", "/prompts").json] == ["global"]


def test_prompt_update_and_delete(admin):
    admin("POST", "/prompts", {"name": "tone", "content": "a"})
    assert admin("PATCH", "/prompts/tone", {"content": "b"}).json["content"] == "b"
    assert admin("DELETE", "/prompts/tone").status_code == 204
    assert admin("GET", "/prompts/tone").status_code == 404


def test_prompts_of_an_unknown_project_are_404(admin):
    assert admin("GET", "/projects/nope/prompts").status_code == 404


# -- personalities ------------------------------------------------------------

def test_personality_keeps_its_prompts_in_order_and_patch_replaces_them(admin, llm):
    make_agent(admin)
    for name in ("a", "b", "c"):
        admin("POST", "/prompts", {"name": name, "content": name})
    created = admin("POST", "/agents/reviewer/personalities",
                    {"name": "calm", "prompts": ["b", "a"]})
    assert created.status_code == 201, created.json
    assert [p["name"] for p in created.json["prompts"]] == ["b", "a"]
    patched = admin("PATCH", "/agents/reviewer/personalities/calm", {"prompts": ["a", "c", "b"]})
    assert [p["name"] for p in patched.json["prompts"]] == ["a", "c", "b"]


def test_personality_prompt_names_resolve_to_the_nearest_scope(admin, llm):
    admin("POST", "/projects", {"name": "proj"})
    make_agent(admin, project="proj")
    admin("POST", "/prompts", {"name": "tone", "content": "global"})
    admin("POST", "/prompts", {"name": "only-global", "content": "g"})
    admin("POST", "/projects/proj/prompts", {"name": "tone", "content": "project"})
    admin("POST", "/projects/proj/prompts", {"name": "style", "content": "project"})
    admin("POST", "/agents/reviewer/prompts", {"name": "style", "content": "agent"})
    view = admin("POST", "/agents/reviewer/personalities",
                 {"name": "p", "prompts": ["tone", "style", "only-global"]}).json
    assert [(p["name"], p["scope"]) for p in view["prompts"]] == [
        ("tone", "project"), ("style", "agent"), ("only-global", "global")]


def test_personality_cannot_use_another_projects_or_agents_prompts(admin, llm):
    admin("POST", "/projects", {"name": "other"})
    make_agent(admin)
    make_agent(admin, "second")
    admin("POST", "/projects/other/prompts", {"name": "theirs", "content": "x"})
    admin("POST", "/agents/second/prompts", {"name": "private", "content": "x"})
    response = admin("POST", "/agents/reviewer/personalities",
                     {"name": "p", "prompts": ["theirs", "private"]})
    assert response.status_code == 404
    assert response.json["error"]["details"] == {"prompts": ["theirs", "private"]}


def test_personality_listing_a_prompt_twice_is_400(admin, llm):
    make_agent(admin)
    admin("POST", "/prompts", {"name": "a", "content": "a"})
    response = admin("POST", "/agents/reviewer/personalities",
                     {"name": "p", "prompts": ["a", "a"]})
    assert response.status_code == 400


def test_personality_name_is_unique_per_agent(admin, llm):
    make_agent(admin)
    make_agent(admin, "second")
    assert admin("POST", "/agents/reviewer/personalities", {"name": "p"}).status_code == 201
    assert admin("POST", "/agents/second/personalities", {"name": "p"}).status_code == 201
    assert admin("POST", "/agents/reviewer/personalities", {"name": "p"}).status_code == 409


def test_deleting_a_prompt_takes_it_out_of_personalities(admin, llm):
    make_agent(admin)
    admin("POST", "/prompts", {"name": "a", "content": "a"})
    admin("POST", "/prompts", {"name": "b", "content": "b"})
    admin("POST", "/agents/reviewer/personalities", {"name": "p", "prompts": ["a", "b"]})
    admin("DELETE", "/prompts/a")
    view = admin("GET", "/agents/reviewer/personalities/p").json
    assert [p["name"] for p in view["prompts"]] == ["b"]


def test_default_personality_is_the_agents_own_and_set_null_on_delete(admin, llm):
    make_agent(admin)
    make_agent(admin, "second")
    admin("POST", "/agents/second/personalities", {"name": "theirs"})
    assert admin("PATCH", "/agents/reviewer",
                 {"default_personality": "theirs"}).status_code == 404
    admin("POST", "/agents/reviewer/personalities", {"name": "mine"})
    assert admin("PATCH", "/agents/reviewer", {"default_personality": "mine"}).json[
        "default_personality"] == "mine"
    assert admin("DELETE", "/agents/reviewer/personalities/mine").status_code == 204
    assert admin("GET", "/agents/reviewer").json["default_personality"] is None


def test_a_new_agent_cannot_name_a_default_personality(admin, llm):
    response = admin("POST", "/agents", {"name": "a", "llm": "up", "default_personality": "p"})
    assert response.status_code == 404
