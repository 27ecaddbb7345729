"""Switchboard publisher: publish a local LLM (vLLM, llama.cpp server,
Ollama, LM Studio) to a Switchboard server, dialling out only.

    python -m publisher_client run --config publisher.yaml
"""
__version__ = "1.0.0"

from publisher_client.config import Config, load_config  # noqa: E402
from publisher_client.errors import PublisherError  # noqa: E402
from publisher_client.publisher import Publisher  # noqa: E402

__all__ = ["Config", "Publisher", "PublisherError", "load_config", "__version__"]
