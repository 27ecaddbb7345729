"""schemathesis against a live server (gunicorn + gevent), driven by
`GET /api/v1/openapi.json`: no 5xx but the contract's own 502/503/504 for
conditions the fuzzer set up itself, and no answer that breaks the document
(status, content type, body schema). DESIGN.md, "Operations": OpenAPI.

Bounded: SWITCHBOARD_FUZZ_EXAMPLES (default 6) examples per operation and
generation mode, no shrinking, derandomized (the same cases on every run; set
SWITCHBOARD_FUZZ_RANDOM=1 to explore). The server's timeouts are short so that
what the fuzzer sets up (a hibernating row it registered, a session that does
not poll) ends in a second, and every upstream URL it writes is pointed at a
FakeOpenAI on loopback: the fuzzer never reaches past this machine.
"""
import collections
import itertools
import os
import re

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

EXAMPLES = int(os.environ.get("SWITCHBOARD_FUZZ_EXAMPLES", "6"))
DERANDOMIZE = not os.environ.get("SWITCHBOARD_FUZZ_RANDOM")
KNOWN_NAMES = itertools.count(1)

SHORT_TIMEOUTS = {
    "SWITCHBOARD_POLL_WAIT_MAX": "0.5",
    "SWITCHBOARD_TASK_PICKUP_TIMEOUT": "1",
    "SWITCHBOARD_INFER_TIMEOUT": "2",
    "SWITCHBOARD_WAKE_TIMEOUT": "1",
    "SWITCHBOARD_QUEUE_TIMEOUT": "1",
    "SWITCHBOARD_STREAM_IDLE_TIMEOUT": "2",
    "SWITCHBOARD_STREAM_KEEPALIVE": "1",
    "SWITCHBOARD_UPSTREAM_CONNECT_TIMEOUT": "1",
    "SWITCHBOARD_PUBLISHER_LOST_TIMEOUT": "2",
}

# The contract's own 5xx, for what the fuzzer can set up itself: an upstream
# that fails (its LLMs all point at the fake; one that answers a status passes
# on), a virtual row whose publisher is not polling, a wake nobody answers.
SET_UP_BY_THE_FUZZER = {
    502: {"upstream_unreachable", "upstream_rejected", "publisher_error", "wake_failed",
          "publisher_lost", "inference_failed", "stream_error", "bad_gateway"},
    503: {"publisher_offline", "publisher_disconnected", "pool_unavailable", "queue_timeout"},
    504: {"pickup_timeout", "task_timeout", "task_not_acknowledged", "timeout"},
}


def only_the_contracts_own_server_errors(ctx, response, case):
    """Like schemathesis' not_a_server_error, but for SET_UP_BY_THE_FUZZER."""
    status = response.status_code
    if status < 500:
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if code in SET_UP_BY_THE_FUZZER.get(status, ()):
        return None
    raise AssertionError(f"server error {status} ({code}): {response.text[:300]}")


CHECKS = [only_the_contracts_own_server_errors, status_code_conformance,
          content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(module_live_server_factory):
    return module_live_server_factory(SHORT_TIMEOUTS)


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json", timeout=10)


@pytest.fixture
def known(server, module_fake_openai):
    """Rows the second pass names in its paths, so that its generated bodies
    reach real LLMs, agents, threads and sessions, not only 404s (new ones for
    each test: the fuzzer deletes them)."""
    admin = server.headers("admin")
    fz = f"fz{next(KNOWN_NAMES)}"
    with requests.Session() as http:
        http.trust_env = False

        def post(path, body):
            response = http.post(server.url + path, json=body, headers=admin, timeout=10)
            assert response.status_code == 201, response.text
            return response.json()

        post("/api/v1/llms", {"name": fz, "model": fz, "url": module_fake_openai.url})
        post("/api/v1/projects", {"name": fz})
        post("/api/v1/agents", {"name": fz, "llm": fz, "project": fz})
        for scope in ("", f"/projects/{fz}", f"/agents/{fz}"):
            post(f"/api/v1{scope}/prompts", {"name": fz, "content": "Be brief."})
        post(f"/api/v1/agents/{fz}/personalities", {"name": fz, "prompts": [fz]})
        thread = post(f"/api/v1/agents/{fz}/threads", {"title": "fuzz"})
        session = post("/api/v1/publishers/register",
                       {"llms": [{"name": f"{fz}-virtual", "model": fz}]})
    return {"name": fz, "owner": fz, "personality": fz, "model": fz,
            "thread_id": thread["id"], "session_id": session["session_id"]}


def confine_to_loopback(case, upstream_url):
    """Any upstream URL the fuzzer writes (an LLM's `url`) → the fake upstream."""
    if isinstance(case.body, dict) and "url" in case.body:
        case.body["url"] = upstream_url


@pytest.mark.timeout(600)
@pytest.mark.parametrize("paths", ["generated", "known"])
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_the_api_answers_as_its_document_says(server, schema, known, module_fake_openai, mode,
                                              paths):
    """Every operation, with generated path parameters, or with those naming
    the `known` rows; with bodies and queries the document allows (positive)
    or forbids (negative)."""
    auth = {"Authorization": f"Bearer {server.tokens['admin']}"}
    failures, answered = [], collections.Counter()
    with requests.Session() as http:
        http.trust_env = False
        operations = [result.ok() for result in schema.get_all_operations()]
        # Deletes last, so that the other operations find the known rows.
        for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):

            fixed = ({name: known[name] for name in re.findall(r"{(\w+)}", operation.path)
                      if name in known}
                     if paths == "known" else None)

            @given(case=operation.as_strategy(generation_mode=mode, headers=auth,
                                              path_parameters=fixed))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      derandomize=DERANDOMIZE, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def exercise(case):
                confine_to_loopback(case, module_fake_openai.url)
                response = case.call(base_url=server.url, session=http, timeout=15)
                answered[operation.label, response.status_code] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except AssertionError as exc:  # schemathesis' FailureGroup is one too
                    failures.append(f"{operation.label}: {exc}")

            try:
                exercise()
            except Unsatisfiable:
                pass  # nothing to generate (negative: every part of it is fixed or free-form)
    print(f"{sum(answered.values())} calls:", dict(sorted(answered.items())))
    assert not failures, "\n\n".join(failures[:10]) + f"\n\n({len(failures)} failures in all)"
    if mode == schemathesis.GenerationMode.POSITIVE and paths == "known":
        # The fuzzer got past validation and lookups, not just 400s and 404s.
        succeeded = {label for (label, status) in answered if status < 300}
        assert len(succeeded) >= 15, sorted(succeeded)
    assert "Traceback" not in server.log_text()
