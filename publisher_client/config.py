"""The publisher's config file (YAML; JSON is valid YAML), checked up front.

Every problem is a ConfigError whose message is one line naming the field,
e.g. `publisher.yaml: llms[0].url: required for type 'openai'`.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from publisher_client.errors import ConfigError

BACKEND_TYPES = ("openai", "echo")
ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "messages")
# What each backend type serves unless an LLM says (`endpoints`): an
# OpenAI-compatible server surely has these three; echo answers them all.
DEFAULT_ENDPOINTS = {"openai": ("chat/completions", "completions", "embeddings"),
                     "echo": ENDPOINTS}
WAKE_TYPES = ("http", "command")
TIERS = ("fast", "heavy")
DEFAULT_SESSION_FILE = "~/.config/switchboard/session.json"
DEFAULT_MAX_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class WakeRecipe:
    type: str                              # "http" | "command"
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS
    timeout_seconds: float | None = None   # bound on the request / command itself
    # url, headers and body may carry a wake controller's token: not in the repr.
    url: str | None = field(default=None, repr=False)                 # http
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    body: str | None = field(default=None, repr=False)
    command: str | None = None             # command
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class LlmConfig:
    name: str
    type: str
    model: str
    url: str | None = None
    tier: str | None = None
    description: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 4
    extra_config: dict | None = None
    wake: WakeRecipe | None = None
    endpoints: tuple[str, ...] = ("chat/completions",)


@dataclass(frozen=True)
class Config:
    server: str
    token: str = field(repr=False)
    session_file: Path
    llms: tuple[LlmConfig, ...]
    agents: tuple[dict, ...] = ()
    heartbeat_seconds: float = 30.0
    poll_wait_seconds: float = 25.0


# Field name → (required, allowed types). Unknown keys are errors: a typo in
# `max_concurency` should not silently fall back to the default.
_TOP = {"server": (True, str), "token": (False, str), "token_env": (False, str),
        "session_file": (False, str), "llms": (True, list), "agents": (False, list),
        "heartbeat_seconds": (False, (int, float)), "poll_wait_seconds": (False, (int, float))}
_LLM = {"name": (True, str), "type": (True, str), "url": (False, str), "model": (False, str),
        "tier": (False, str), "description": (False, str), "api_key_env": (False, str),
        "max_concurrency": (False, int), "extra_config": (False, dict), "wake": (False, dict),
        "endpoints": (False, list)}
_WAKE = {"type": (True, str), "max_wait_seconds": (False, (int, float)),
         "timeout_seconds": (False, (int, float)), "url": (False, str), "method": (False, str),
         "headers": (False, dict), "body": (False, (str, dict, list)), "command": (False, str),
         "args": (False, list)}
_AGENT = {"name": (True, str), "llm": (True, str), "description": (False, str),
          "system_prompt": (False, str), "project": (False, str),
          "default_params": (False, dict), "extras": (False, dict)}


def load_config(path, environ=None) -> Config:
    """Read and check the config at `path`. Raises ConfigError (one line)."""
    environ = os.environ if environ is None else environ
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    try:
        return parse_config(raw, environ)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(raw: Any, environ) -> Config:
    top = _check_mapping(raw, _TOP, "")
    token = top.get("token")
    if token is None:
        token_env = top.get("token_env")
        if token_env is None:
            raise ConfigError("token or token_env: one is required")
        token = environ.get(token_env)
        if not token:
            raise ConfigError(f"token_env: environment variable {token_env} is not set")
    if not top["server"].startswith(("http://", "https://")):
        raise ConfigError("server: must be an http:// or https:// URL")
    _check_server_base(top["server"].rstrip("/"))
    if not top["llms"]:
        raise ConfigError("llms: publish at least one LLM")
    llms = tuple(_parse_llm(item, f"llms[{i}]", environ) for i, item in enumerate(top["llms"]))
    _check_unique([llm.name for llm in llms], "llms")
    agents = tuple(_check_mapping(item, _AGENT, f"agents[{i}]")
                   for i, item in enumerate(top.get("agents") or []))
    _check_unique([agent["name"] for agent in agents], "agents")
    return Config(
        server=top["server"].rstrip("/"),
        token=token,
        session_file=Path(top.get("session_file", DEFAULT_SESSION_FILE)).expanduser(),
        llms=llms,
        agents=agents,
        heartbeat_seconds=_positive(top, "heartbeat_seconds", 30.0, ""),
        poll_wait_seconds=_positive(top, "poll_wait_seconds", 25.0, ""),
    )


def _check_server_base(server: str):
    """`server` is where Switchboard itself is served: the client adds
    /api/v1. The OpenAI base URL (`.../v1`) is the natural mistake."""
    for suffix in ("/api/v1", "/v1"):
        if server.endswith(suffix):
            raise ConfigError(f"server: must be Switchboard's base URL, without {suffix} "
                              f"(the publisher adds /api/v1 itself): use "
                              f"{server[:-len(suffix)] or server}")


def _parse_llm(raw, where, environ) -> LlmConfig:
    item = _check_mapping(raw, _LLM, where)
    kind = item["type"]
    if kind not in BACKEND_TYPES:
        raise ConfigError(f"{where}.type: unknown backend type {kind!r} "
                          f"(expected one of: {', '.join(BACKEND_TYPES)})")
    if kind == "openai":
        for key in ("url", "model"):
            if key not in item:
                raise ConfigError(f"{where}.{key}: required for type 'openai'")
    if item.get("tier") is not None and item["tier"] not in TIERS:
        raise ConfigError(f"{where}.tier: must be one of: {', '.join(TIERS)}")
    api_key = None
    if "api_key_env" in item:
        api_key = environ.get(item["api_key_env"])
        if not api_key:
            raise ConfigError(f"{where}.api_key_env: environment variable "
                              f"{item['api_key_env']} is not set")
    max_concurrency = item.get("max_concurrency", 4)
    if max_concurrency < 1:
        raise ConfigError(f"{where}.max_concurrency: must be at least 1")
    endpoints = tuple(item.get("endpoints", DEFAULT_ENDPOINTS[kind]))
    unknown = [e for e in endpoints if e not in ENDPOINTS]
    if unknown or not endpoints:
        raise ConfigError(f"{where}.endpoints: must list some of: {', '.join(ENDPOINTS)}"
                          + (f" (not {unknown[0]!r})" if unknown else ""))
    _check_unique(list(endpoints), f"{where}.endpoints")
    return LlmConfig(
        name=item["name"], type=kind, model=item.get("model", kind), endpoints=endpoints,
        url=item["url"].rstrip("/") if "url" in item else None,
        tier=item.get("tier"), description=item.get("description"), api_key=api_key,
        max_concurrency=max_concurrency, extra_config=item.get("extra_config"),
        wake=_parse_wake(item["wake"], f"{where}.wake") if "wake" in item else None,
    )


def _parse_wake(raw, where) -> WakeRecipe:
    item = _check_mapping(raw, _WAKE, where)
    kind = item["type"]
    if kind not in WAKE_TYPES:
        raise ConfigError(f"{where}.type: unknown wake recipe type {kind!r} "
                          f"(expected one of: {', '.join(WAKE_TYPES)})")
    needed = "url" if kind == "http" else "command"
    if needed not in item:
        raise ConfigError(f"{where}.{needed}: required for wake type {kind!r}")
    body = item.get("body")
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return WakeRecipe(
        type=kind,
        max_wait_seconds=_positive(item, "max_wait_seconds", DEFAULT_MAX_WAIT_SECONDS, where),
        timeout_seconds=_positive(item, "timeout_seconds", None, where),
        url=item.get("url"), method=item.get("method", "POST").upper(),
        headers={str(k): str(v) for k, v in (item.get("headers") or {}).items()},
        body=body, command=item.get("command"),
        args=tuple(str(arg) for arg in item.get("args") or ()),
    )


def _check_mapping(raw, spec, where) -> dict:
    """`where` is the path of this mapping in the file ("" at the top)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping")
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in spec:
            raise ConfigError(f"{prefix}{key}: unknown field")
    for key, (required, types) in spec.items():
        if key not in raw or raw[key] is None:
            if required:
                raise ConfigError(f"{prefix}{key}: required")
            continue
        value = raw[key]
        # bool is an int in Python; `max_concurrency: yes` is still a mistake.
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"{prefix}{key}: must be {_type_name(types)}")
    return {key: value for key, value in raw.items() if value is not None}


def _positive(item, key, default, where):
    value = item.get(key, default)
    if value is not None and value <= 0:
        raise ConfigError(f"{where + '.' if where else ''}{key}: must be positive")
    return None if value is None else float(value)


def _check_unique(names, where):
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{where}: duplicate names: {', '.join(duplicates)}")


def _type_name(types) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list",
             dict: "a mapping"}
    types = types if isinstance(types, tuple) else (types,)
    if types == (int, float):
        return "a number"
    return " or ".join(names[t] for t in types)
