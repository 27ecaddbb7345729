"""JSON out: orjson, and the standard library where orjson cannot (found by
the OpenAPI fuzzer on PostgreSQL)."""
import json

from jsonio import dumps


def test_an_integer_beyond_64_bits_is_still_written():
    huge = 347046553607771840 * 10 ** 170
    assert json.loads(dumps({"n": huge, 1: "list position"})) == {"n": huge, "1": "list position"}


def test_a_huge_number_in_extra_config_comes_back(client, auth):
    """PostgreSQL's JSONB keeps 3.47e187 as a 188-digit integer."""
    created = client.post("/api/v1/llms", headers=auth("admin"), json={
        "name": "big-numbers", "model": "m", "url": "http://127.0.0.1:9/v1",
        "extra_config": {"big": 3.4704655360777184e+187, "small": 5.603019912454063e+16}})
    assert created.status_code == 201, created.text
    for response in (created, client.get("/api/v1/llms/big-numbers", headers=auth("admin"))):
        assert response.status_code == 200 or response.status_code == 201
        config = response.get_json()["extra_config"]
        assert float(config["big"]) == 3.4704655360777184e+187
        assert float(config["small"]) == 5.603019912454063e+16
