"""Fixtures of the publisher client's unit tests: a config builder and a
strict `responses` mock (a registered call that never happens fails the test)."""
import pytest
import responses

from publisher_client.config import parse_config
from tests.publisher_client.helpers import BACKEND, SERVER


@pytest.fixture
def make_config(tmp_path):
    """make_config(environ=None, **top_level_overrides) → a Config; the
    default publishes one `openai` LLM at BACKEND with token tok-abc."""
    def make(environ=None, **overrides):
        raw = {"server": SERVER, "token": "tok-abc",
               "session_file": str(tmp_path / "state" / "session.json"),
               "poll_wait_seconds": 0.05,
               "llms": [{"name": "vllm-local", "type": "openai", "url": BACKEND,
                         "model": "qwen", "tier": "fast"}]}
        raw.update(overrides)
        return parse_config(raw, environ=environ or {})
    return make


@pytest.fixture
def mocked():
    with responses.RequestsMock() as rsps:
        yield rsps
