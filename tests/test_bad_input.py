"""Input that used to get through: names with a final newline, 1 and 0 as
booleans, encoded slashes in paths."""
import pytest


@pytest.fixture
def admin(client, auth):
    def call(method, path, body=None):
        return client.open(f"/api/v1{path}", method=method, json=body, headers=auth("admin"))
    return call


@pytest.mark.parametrize("path, body", [
    ("/llms", {"name": "abc\n", "type": "openai", "model": "m", "url": "http://x.test/v1"}),
    ("/projects", {"name": "abc\n"}),
    ("/prompts", {"name": "abc\n", "content": "hi"}),
])
def test_a_name_with_a_final_newline_is_refused(admin, path, body):
    response = admin("POST", path, body)
    assert response.status_code == 400
    assert "name" in response.json["error"]["details"]


def test_a_published_name_with_a_final_newline_is_refused(client, auth):
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json={"llms": [{"name": "abc\n", "model": "m"}]})
    assert response.status_code == 400
    response = client.post("/api/v1/publishers/register", headers=auth("publisher"),
                           json={"session_id": "s1\n", "llms": []})
    assert response.status_code == 400


@pytest.mark.parametrize("value", [1, 0])
def test_one_and_zero_are_not_booleans(client, auth, value):
    infer = client.post("/api/v1/llms/anything/infer", headers=auth("client"),
                        json={"messages": [{"role": "user", "content": "hi"}], "stream": value})
    assert infer.status_code == 400
    assert "stream" in infer.json["error"]["details"]
    chunks = client.post("/api/v1/tasks/some-task/chunks", headers=auth("publisher"),
                         json={"chunks": [], "done": value})
    assert chunks.status_code == 400
    assert "done" in chunks.json["error"]["details"]
    chat = client.post("/api/v1/agents/anyone/chat", headers=auth("client"),
                       json={"message": "hi", "stream": value})
    assert chat.status_code == 400
    assert "stream" in chat.json["error"]["details"]


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/v1/agents/%2F/personalities"),
    ("POST", "/api/v1/tasks/%2E%2E%2F/result"),
    ("GET", "/api/v1/llms/%2F"),
])
def test_an_encoded_slash_in_a_path_is_our_404_not_a_redirect(client, auth, method, path):
    response = client.open(path, method=method, json={"name": "x"}, headers=auth("admin"))
    assert response.status_code == 404
    assert response.json["error"]["code"]
