"""`/healthz` says the process is up; `/readyz` whether it can serve: its database
and its task bus answer."""
import pytest

from tests.support.live import free_port


def test_readyz_is_open_and_ok_when_database_and_bus_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "checks": {"database": "ok", "bus": "ok"}}


@pytest.mark.parametrize("app_config", [{"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}])
def test_readyz_is_503_naming_the_bus_when_redis_does_not_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json == {"status": "fail", "checks": {"database": "ok", "bus": "fail"}}
    assert client.get("/healthz").status_code == 200  # the process itself is fine


@pytest.mark.parametrize("app_config", [{
    "SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"}])
def test_readyz_is_503_naming_the_database_when_it_does_not_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["database"] == "fail"
