def test_healthz_is_open(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"ok": True}


def test_admin_creates_and_reads_llm(client, auth):
    created = client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "gpt-x", "model": "m", "url": "http://127.0.0.1:9/v1", "api_key": "sk-secret"})
    assert created.status_code == 201, created.json
    assert created.json["has_api_key"] is True
    assert "sk-secret" not in created.get_data(as_text=True)
    listed = client.get("/api/v1/llms", headers=auth("client"))
    assert [llm["name"] for llm in listed.json] == ["gpt-x"]
