"""The LLM registry over HTTP: CRUD, validation, optimistic concurrency."""
import pytest

LLMS = "/api/v1/llms"
VIEW_FIELDS = {"id", "name", "type", "model", "url", "tier", "description", "extra_config",
               "kind", "status", "provider_session_id", "last_heartbeat_at", "inactive_since",
               "version", "created_at", "updated_at", "has_api_key", "max_concurrency",
               "endpoints"}


def new_llm(**fields):
    return {"name": "gpt-x", "type": "openai", "model": "gpt-4o-mini",
            "url": "http://127.0.0.1:9/v1", **fields}


@pytest.fixture
def admin(client, auth):
    """Requests as the admin: admin("post", path, json=...)."""
    return lambda method, path, **kw: getattr(client, method)(path, headers=auth("admin"), **kw)


@pytest.fixture
def created(admin):
    response = admin("post", LLMS, json=new_llm(api_key="sk-secret", description="small"))
    assert response.status_code == 201, response.json
    return response.json


def assert_error(response, status, code=None):
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert set(error) == {"message", "type", "code", "details"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# -- CRUD --------------------------------------------------------------------

def test_create_returns_the_full_view_of_a_public_active_row(created):
    assert set(created) == VIEW_FIELDS
    assert created["name"] == "gpt-x"
    assert created["kind"] == "public"
    assert created["status"] == "active"
    assert created["version"] == 1
    assert created["tier"] == "fast"
    assert created["has_api_key"] is True
    assert created["created_at"].endswith("Z")


def test_create_without_key_says_it_has_none(admin):
    response = admin("post", LLMS, json=new_llm())
    assert response.status_code == 201
    assert response.json["has_api_key"] is False


def test_get_returns_the_row_by_name(client, auth, created):
    response = client.get(f"{LLMS}/gpt-x", headers=auth("client"))
    assert response.status_code == 200
    assert response.json == created


def test_list_returns_an_array_of_views_sorted_by_name(admin):
    for name in ("zeta", "alpha", "mid"):
        admin("post", LLMS, json=new_llm(name=name))
    response = admin("get", LLMS)
    assert [llm["name"] for llm in response.json] == ["alpha", "mid", "zeta"]
    assert all(set(llm) == VIEW_FIELDS for llm in response.json)


def test_create_with_a_taken_name_is_409(admin, created):
    assert_error(admin("post", LLMS, json=new_llm()), 409)


def test_patch_updates_the_given_fields_only(admin, created):
    response = admin("patch", f"{LLMS}/gpt-x", json={"tier": "heavy", "model": "big"})
    assert response.status_code == 200
    assert response.json["tier"] == "heavy"
    assert response.json["model"] == "big"
    assert response.json["description"] == "small"
    assert response.json["has_api_key"] is True


def test_patch_can_clear_the_api_key(admin, created):
    response = admin("patch", f"{LLMS}/gpt-x", json={"api_key": None})
    assert response.json["has_api_key"] is False


def test_delete_removes_the_row(admin, created):
    response = admin("delete", f"{LLMS}/gpt-x")
    assert response.status_code == 204
    assert response.data == b""
    assert_error(admin("get", f"{LLMS}/gpt-x"), 404, "llm_not_found")


def test_get_patch_delete_of_an_unknown_llm_are_404(admin):
    for method in ("get", "delete"):
        assert_error(admin(method, f"{LLMS}/nope"), 404, "llm_not_found")
    assert_error(admin("patch", f"{LLMS}/nope", json={"tier": "heavy"}), 404, "llm_not_found")


# -- optimistic concurrency --------------------------------------------------

def test_each_update_bumps_the_version(admin, created):
    first = admin("patch", f"{LLMS}/gpt-x", json={"description": "one"}).json
    second = admin("patch", f"{LLMS}/gpt-x", json={"description": "two"}).json
    assert (first["version"], second["version"]) == (2, 3)


def test_patch_with_the_current_version_applies(admin, created):
    response = admin("patch", f"{LLMS}/gpt-x", json={"description": "new", "version": 1})
    assert response.status_code == 200
    assert response.json["version"] == 2


def test_patch_with_a_stale_version_is_409_and_changes_nothing(admin, created):
    admin("patch", f"{LLMS}/gpt-x", json={"description": "first writer"})
    error = assert_error(admin("patch", f"{LLMS}/gpt-x",
                               json={"description": "second writer", "version": 1}),
                         409, "version_conflict")
    assert error["details"] == {"version": 2}
    assert admin("get", f"{LLMS}/gpt-x").json["description"] == "first writer"


# -- validation --------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("kind", "virtual"), ("status", "inactive"), ("provider_session_id", "s1"),
    ("version", 7), ("id", "abc"), ("has_api_key", True), ("bogus", 1)])
def test_create_rejects_fields_crud_cannot_set(admin, field, value):
    error = assert_error(admin("post", LLMS, json=new_llm(**{field: value})), 400,
                         "validation_failed")
    assert field in error["details"]


@pytest.mark.parametrize("field", ["kind", "status", "provider_session_id", "name"])
def test_patch_rejects_fields_crud_cannot_set(admin, created, field):
    error = assert_error(admin("patch", f"{LLMS}/gpt-x", json={field: "x"}), 400)
    assert field in error["details"]


@pytest.mark.parametrize("field, value", [
    ("model", 5), ("url", ["http://x"]), ("tier", "huge"), ("type", "anthropic"),
    ("extra_config", "not-an-object"), ("description", None), ("api_key", 42)])
def test_create_with_a_wrong_value_names_the_field(admin, field, value):
    error = assert_error(admin("post", LLMS, json=new_llm(**{field: value})), 400,
                         "validation_failed")
    assert list(error["details"]) == [field]
    assert field in error["message"]


def test_patch_version_must_be_an_integer(admin, created):
    error = assert_error(admin("patch", f"{LLMS}/gpt-x", json={"version": "1"}), 400)
    assert list(error["details"]) == ["version"]


@pytest.mark.parametrize("missing", ["name", "model", "url"])
def test_create_requires_name_model_and_url(admin, missing):
    body = new_llm()
    del body[missing]
    error = assert_error(admin("post", LLMS, json=body), 400)
    assert list(error["details"]) == [missing]


@pytest.mark.parametrize("name", ["-leading-dash", ".dot", "has space", "slash/y", "é", "",
                                  "x" * 101, "semi;colon"])
def test_names_outside_the_safe_pattern_are_400(admin, name):
    error = assert_error(admin("post", LLMS, json=new_llm(name=name)), 400)
    assert list(error["details"]) == ["name"]


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 100])
def test_names_inside_the_safe_pattern_are_accepted(admin, name):
    assert admin("post", LLMS, json=new_llm(name=name)).status_code == 201


@pytest.mark.parametrize("url", ["ftp://host/v1", "not a url", "//host/v1"])
def test_url_must_be_http_or_https(admin, url):
    error = assert_error(admin("post", LLMS, json=new_llm(url=url)), 400)
    assert list(error["details"]) == ["url"]


def test_malformed_json_is_400(client, auth):
    response = client.post(LLMS, data=b'{"name": ', content_type="application/json",
                           headers=auth("admin"))
    assert_error(response, 400, "malformed_json")


def test_a_json_array_body_is_400(client, auth):
    response = client.post(LLMS, json=[new_llm()], headers=auth("admin"))
    assert_error(response, 400, "malformed_json")


def test_an_empty_body_is_400(client, auth):
    response = client.post(LLMS, data=b"", headers=auth("admin"))
    assert_error(response, 400, "malformed_json")


def test_an_update_racing_another_is_a_version_conflict(app, created):
    from extensions import db
    from services import registry
    from services.errors import Conflict

    cipher = app.extensions["api_key_cipher"]
    with app.app_context():
        mine = db.session()
        loaded = registry.get_llm(mine, "gpt-x")  # this request read version 1 ...
        assert loaded.version == 1
        with app.app_context():  # ... and another request commits before it writes
            registry.update_llm(db.session, "gpt-x", {"description": "theirs"}, cipher)
            db.session.commit()
        with pytest.raises(Conflict) as caught:
            registry.update_llm(mine, "gpt-x", {"description": "mine"}, cipher)
        assert caught.value.code == "version_conflict"
    with app.app_context():
        assert registry.get_llm(db.session, "gpt-x").description == "theirs"


@pytest.mark.parametrize("url", ["http://gpu_box:8000/v1", "https://10.0.0.7/v1",
                                 "http://[::1]:8080/v1"])
def test_url_may_name_any_resolvable_host(admin, url):
    response = admin("post", LLMS, json=new_llm(url=url))
    assert response.status_code == 201, response.json
    assert response.json["url"] == url


@pytest.mark.parametrize("url", ["http://host:99999/v1", "http:///v1", "http://ho st/v1"])
def test_url_with_a_bad_port_host_or_spaces_is_refused(admin, url):
    assert_error(admin("post", LLMS, json=new_llm(url=url)), 400)
