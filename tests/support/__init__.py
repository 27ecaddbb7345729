"""Test support: a live Switchboard under gunicorn (`live`) and a fake
OpenAI-compatible upstream (`fake_openai`). Import as `tests.support`."""
from .fake_openai import FakeOpenAI, ScriptedReply
from .live import LiveServer, start_server

__all__ = ["FakeOpenAI", "LiveServer", "ScriptedReply", "start_server"]
