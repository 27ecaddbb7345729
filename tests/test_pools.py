"""Pools by model, declared capacity and failover, through the app (public
upstreams faked with `responses`; tests/test_e2e_pools.py has publishers,
streams and the fair queue under gunicorn)."""
import threading

import pytest
import responses

from tests.support.waiting import wait_until

A, B = "http://a.test/v1", "http://b.test/v1"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def completion(text):
    return {"object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def admin(client, auth):
    def call(method, path, body=None):
        return client.open(f"/api/v1{path}", method=method, json=body, headers=auth("admin"))
    return call


@pytest.fixture
def two_boxes(admin):
    """Two public LLMs serving model `qwen/7b` (a pool), capacity 1 each."""
    for name, url in (("box-a", A), ("box-b", B)):
        assert admin("POST", "/llms", {"name": name, "model": "qwen/7b", "url": url,
                                       "max_concurrency": 1}).status_code == 201


@pytest.fixture
def upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def pool_infer(client, auth, model="qwen/7b", body=CHAT, via="api"):
    if via == "api":
        return client.post(f"/api/v1/pools/{model}/infer", json=body, headers=auth("client"))
    return client.post("/v1/chat/completions", json={**body, "model": f"pool:{model}"},
                       headers=auth("client"))


# -- declared capacity ----------------------------------------------------------

def test_an_llm_declares_its_capacity_and_a_patch_can_lift_it(admin):
    created = admin("POST", "/llms", {"name": "box", "model": "m", "url": A,
                                      "max_concurrency": 8})
    assert created.json["max_concurrency"] == 8
    assert admin("PATCH", "/llms/box", {"max_concurrency": None}).json["max_concurrency"] is None


@pytest.mark.parametrize("value", [0, 1025, "4", True, 2.5])
def test_a_capacity_outside_1_to_1024_is_a_400(admin, value):
    response = admin("POST", "/llms", {"name": "box", "model": "m", "url": A,
                                       "max_concurrency": value})
    assert response.status_code == 400
    assert "max_concurrency" in response.json["error"]["details"]


def test_a_publisher_declares_its_rows_capacity_and_a_register_without_it_lifts_it(client,
                                                                                    auth):
    def register(llm):
        response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                               json={"session_id": "s1", "llms": [llm]})
        assert response.status_code == 201, response.json
        return response.json["llms"][0]["max_concurrency"]

    assert register({"name": "gpu", "model": "m", "max_concurrency": 2}) == 2
    assert register({"name": "gpu", "model": "m"}) is None


# -- pools ------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["api", "v1"])
def test_a_pool_answers_from_one_of_its_members(client, auth, two_boxes, upstream, via):
    upstream.post(f"{A}/chat/completions", json=completion("from a"))
    upstream.post(f"{B}/chat/completions", json=completion("from b"))
    response = pool_infer(client, auth, via=via)
    assert response.status_code == 200
    assert response.json["choices"][0]["message"]["content"] in ("from a", "from b")
    sent = upstream.calls[0].request
    assert b'"model":"qwen/7b"' in sent.body


def test_idle_members_take_turns(client, auth, two_boxes, upstream):
    upstream.post(f"{A}/chat/completions", json=completion("a"))
    upstream.post(f"{B}/chat/completions", json=completion("b"))
    answers = [pool_infer(client, auth).json["choices"][0]["message"]["content"]
               for _ in range(4)]
    assert sorted(answers) == ["a", "a", "b", "b"]


def test_a_busy_member_is_passed_over_for_a_free_one(app, client, auth, two_boxes, upstream):
    release, calls = threading.Event(), []

    def first_one_is_slow(request):
        calls.append(request.url.split("/chat")[0])
        if len(calls) == 1:
            release.wait(10)
        return 200, {}, '{"object": "chat.completion", "choices": []}'

    for url in (A, B):
        upstream.add_callback(responses.POST, f"{url}/chat/completions",
                              callback=first_one_is_slow)
    first = threading.Thread(target=lambda: app.test_client().post(
        "/api/v1/pools/qwen/7b/infer", json=CHAT, headers=auth("client")))
    first.start()
    wait_until(lambda: calls, message="the first request runs")
    assert pool_infer(client, auth).status_code == 200  # not queued behind the busy one
    release.set()
    first.join(10)
    assert len(calls) == 2 and calls[0] != calls[1]


def test_an_unknown_model_is_404_and_one_without_a_usable_member_is_503(admin, client, auth):
    missing = pool_infer(client, auth, model="nobody/serves-this")
    assert (missing.status_code, missing.json["error"]["code"]) == (404, "model_not_found")
    registered = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                             json={"llms": [{"name": "gone-box", "model": "lonely"}]})
    client.delete(f"/api/v1/publishers/{registered.json['session_id']}",
                  headers=auth("publisher"))
    offline = pool_infer(client, auth, model="lonely")
    assert (offline.status_code, offline.json["error"]["code"]) == (503, "pool_unavailable")


def test_models_list_the_pools_and_retrieve_one(client, auth, two_boxes):
    ids = [m["id"] for m in client.get("/v1/models", headers=auth("client")).json["data"]]
    assert ids == ["box-a", "box-b", "pool:qwen/7b"]
    pool = client.get("/v1/models/pool:qwen/7b", headers=auth("client"))
    assert (pool.status_code, pool.json["id"], pool.json["owned_by"]) == (
        200, "pool:qwen/7b", "pool")
    assert client.get("/v1/models/pool:nope", headers=auth("client")).status_code == 404


# -- failover before the first byte ---------------------------------------------------

def test_a_member_that_fails_before_the_first_byte_is_replaced_once(client, auth, two_boxes,
                                                                    upstream):
    upstream.post(f"{A}/chat/completions", status=503, json={"error": {"message": "down"}})
    upstream.post(f"{B}/chat/completions", status=503, json={"error": {"message": "down"}})
    # Whichever member goes first fails; the other one is tried, and its answer goes back.
    response = pool_infer(client, auth)
    assert response.status_code == 503
    assert len(upstream.calls) == 2  # once more, not forever
    assert {c.request.url.split("/chat")[0] for c in upstream.calls} == {A, B}


def test_a_failover_costs_the_client_nothing_but_time(client, auth, two_boxes, upstream):
    calls = []  # whichever member is asked first answers 502, the next one 200

    def first_fails(request):
        calls.append(request.url)
        if len(calls) == 1:
            return 502, {}, '{"error": {"message": "oops"}}'
        return 200, {}, '{"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}'

    for url in (A, B):
        upstream.add_callback(responses.POST, f"{url}/chat/completions", callback=first_fails)
    response = pool_infer(client, auth)
    assert response.status_code == 200
    assert len(calls) == 2 and calls[0].split("/chat")[0] != calls[1].split("/chat")[0]


def test_a_single_llm_is_never_failed_over(admin, client, auth, upstream):
    admin("POST", "/llms", {"name": "solo", "model": "m", "url": A, "max_concurrency": 2})
    upstream.post(f"{A}/chat/completions", status=503, json={"error": {"message": "down"}})
    response = client.post("/api/v1/llms/solo/infer", json=CHAT, headers=auth("client"))
    assert response.status_code == 503
    assert len(upstream.calls) == 1


# -- agents on a pool -------------------------------------------------------------------

def test_an_agent_runs_on_an_llm_or_a_pool_never_both(admin, two_boxes):
    both = admin("POST", "/agents", {"name": "x", "llm": "box-a", "model": "qwen/7b"})
    assert both.status_code == 400
    neither = admin("POST", "/agents", {"name": "x"})
    assert neither.status_code == 400
    unknown = admin("POST", "/agents", {"name": "x", "model": "nobody/serves-this"})
    assert (unknown.status_code, unknown.json["error"]["code"]) == (404, "model_not_found")
    pooled = admin("POST", "/agents", {"name": "pooled", "model": "qwen/7b"})
    assert (pooled.status_code, pooled.json["llm"], pooled.json["model"]) == (
        201, None, "qwen/7b")
    repinned = admin("PATCH", "/agents/pooled", {"llm": "box-b"})
    assert (repinned.json["llm"], repinned.json["model"]) == ("box-b", None)
    assert admin("PATCH", "/agents/pooled", {"model": "qwen/7b"}).json["llm"] is None


def test_an_agent_on_a_pool_answers_through_it_in_chat_and_on_v1(admin, client, auth,
                                                                 two_boxes, upstream):
    upstream.post(f"{A}/chat/completions", json=completion("pooled answer"))
    upstream.post(f"{B}/chat/completions", json=completion("pooled answer"))
    admin("POST", "/agents", {"name": "pooled", "model": "qwen/7b", "system_prompt": "Be brief."})
    chat = client.post("/api/v1/agents/pooled/chat", json={"message": "hi"},
                       headers=auth("client"))
    assert (chat.status_code, chat.json["assistant"]) == (200, "pooled answer")
    v1 = client.post("/v1/chat/completions", headers=auth("client"), json={
        "model": "agent:pooled", "messages": [{"role": "user", "content": "hi"}]})
    assert v1.status_code == 200
    ids = [m["id"] for m in client.get("/v1/models", headers=auth("client")).json["data"]]
    assert "agent:pooled" in ids
    assert admin("DELETE", "/llms/box-a").status_code == 204  # a pool pins no row
