"""Config loading: the DESIGN.md format, and one clear line plus exit code 2
for a bad config."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from publisher_client.__main__ import main
from publisher_client.config import load_config
from publisher_client.errors import ConfigError

DESIGN_EXAMPLE = """\
server: https://switchboard.example.com
token_env: SWITCHBOARD_TOKEN        # or token: "..."
session_file: ~/.config/switchboard/session.json
llms:
  - name: vllm-local
    type: openai
    url: http://127.0.0.1:8000/v1
    model: Qwen/Qwen2.5-7B-Instruct-AWQ
    tier: fast
    description: the GPU box under the desk
    api_key_env: VLLM_API_KEY       # optional
    max_concurrency: 4
    wake:
      type: command
      command: /usr/local/bin/start-vllm
      args: [--profile, qwen3]
      max_wait_seconds: 120
agents:
  - name: local-coder
    llm: vllm-local
    system_prompt: You review diffs.
    default_params: {temperature: 0.2}
"""
ENV = {"SWITCHBOARD_TOKEN": "sb_pub", "VLLM_API_KEY": "sk-local"}


def write(tmp_path, text, name="publisher.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_design_example_loads(tmp_path):
    config = load_config(write(tmp_path, DESIGN_EXAMPLE), environ=ENV)

    assert config.server == "https://switchboard.example.com"
    assert config.token == "sb_pub"
    assert str(config.session_file).endswith(".config/switchboard/session.json")
    assert "~" not in str(config.session_file)
    (llm,) = config.llms
    assert (llm.name, llm.type, llm.url, llm.model, llm.tier, llm.max_concurrency) == \
        ("vllm-local", "openai", "http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct-AWQ",
         "fast", 4)
    assert llm.api_key == "sk-local"
    assert (llm.wake.type, llm.wake.command, llm.wake.args, llm.wake.max_wait_seconds) == \
        ("command", "/usr/local/bin/start-vllm", ("--profile", "qwen3"), 120)
    assert config.agents == ({"name": "local-coder", "llm": "vllm-local",
                              "system_prompt": "You review diffs.",
                              "default_params": {"temperature": 0.2}},)


def test_an_llm_serves_what_its_backend_type_serves_unless_it_lists_endpoints(tmp_path):
    config = load_config(write(tmp_path, (
        "server: http://h\ntoken: t\nllms:\n"
        "  - {name: a, type: openai, model: m, url: http://b/v1}\n"
        "  - {name: b, type: echo}\n"
        "  - {name: c, type: openai, model: m, url: http://b/v1, endpoints: [messages]}\n")),
        environ={})
    assert [llm.endpoints for llm in config.llms] == [
        ("chat/completions", "completions", "embeddings"),
        ("chat/completions", "completions", "embeddings", "responses", "messages"),
        ("messages",)]


def test_a_json_config_is_valid_yaml(tmp_path):
    path = write(tmp_path, json.dumps({"server": "http://h:8000/", "token": "t",
                                       "llms": [{"name": "e", "type": "echo"}]}), "p.json")

    config = load_config(path, environ={})

    assert config.server == "http://h:8000"
    assert config.llms[0].model == "echo"      # echo needs neither url nor model


def test_an_api_key_is_kept_out_of_the_repr(tmp_path):
    config = load_config(write(tmp_path, DESIGN_EXAMPLE), environ=ENV)

    assert "sk-local" not in repr(config) and "sb_pub" not in repr(config)


def test_a_wake_recipe_url_headers_and_body_are_kept_out_of_the_repr(tmp_path):
    text = ("server: http://h\ntoken: t\nllms:\n  - name: a\n    type: echo\n    wake:\n"
            "      type: http\n      url: http://wake.local/up?token=url-secret\n"
            "      headers: {Authorization: Bearer header-secret}\n"
            "      body: {key: body-secret}\n")
    config = load_config(write(tmp_path, text), environ={})

    assert config.llms[0].wake.headers == {"Authorization": "Bearer header-secret"}
    assert "secret" not in repr(config)


@pytest.mark.parametrize("text, message", [
    ("llms: []\n", "server: required"),
    ("server: http://h\ntoken: t\nllms: []\n", "llms: publish at least one LLM"),
    ("server: http://h\nllms: [{name: a, type: echo}]\n", "token or token_env: one is required"),
    ("server: http://h\ntoken_env: NOPE\nllms: [{name: a, type: echo}]\n",
     "token_env: environment variable NOPE is not set"),
    ("server: h\ntoken: t\nllms: [{name: a, type: echo}]\n",
     "server: must be an http:// or https:// URL"),
    ("server: http://127.0.0.1:8000/v1\ntoken: t\nllms: [{name: a, type: echo}]\n",
     "server: must be Switchboard's base URL, without /v1 (the publisher adds /api/v1 "
     "itself): use http://127.0.0.1:8000"),
    ("server: https://h/sb/api/v1/\ntoken: t\nllms: [{name: a, type: echo}]\n",
     "server: must be Switchboard's base URL, without /api/v1 (the publisher adds /api/v1 "
     "itself): use https://h/sb"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: ollama}]\n",
     "llms[0].type: unknown backend type 'ollama' (expected one of: openai, echo)"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: openai, model: m}]\n",
     "llms[0].url: required for type 'openai'"),
    ("server: http://h\ntoken: t\nllms: [{type: echo}]\n", "llms[0].name: required"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, max_concurency: 2}]\n",
     "llms[0].max_concurency: unknown field"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, max_concurrency: many}]\n",
     "llms[0].max_concurrency: must be an integer"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, wake: {type: ssh}}]\n",
     "llms[0].wake.type: unknown wake recipe type 'ssh'"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, wake: {type: http}}]\n",
     "llms[0].wake.url: required for wake type 'http'"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo}, {name: a, type: echo}]\n",
     "llms: duplicate names: a"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo}]\nagents: [{name: x}]\n",
     "agents[0].llm: required"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, endpoints: [chat, embeddings]}]\n",
     "llms[0].endpoints: must list some of: chat/completions, completions, embeddings, "
     "responses, messages (not 'chat')"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, endpoints: []}]\n",
     "llms[0].endpoints: must list some of"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, endpoints: [embeddings, "
     "embeddings]}]\n", "llms[0].endpoints: duplicate names: embeddings"),
    ("server: http://h\ntoken: t\nllms: [{name: a, type: echo, endpoints: embeddings}]\n",
     "llms[0].endpoints: must be a list"),
    ("server: [unclosed\n", "not valid YAML (line"),
    ("- just\n- a list\n", "config: must be a mapping"),
])
def test_a_bad_config_names_the_field(tmp_path, text, message):
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})

    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config: No such file or directory"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exits_2_with_one_line_for_a_bad_config(tmp_path, capsys):
    path = write(tmp_path, "server: http://h\ntoken: t\nllms: [{name: a, type: bogus}]\n")

    assert main(["run", "--config", str(path)]) == 2

    err = capsys.readouterr().err
    assert err == f"error: {path}: llms[0].type: unknown backend type 'bogus' " \
                  "(expected one of: openai, echo)\n"


def test_cli_exits_2_for_an_unreadable_file_as_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "publisher_client", "run", "--config",
                             str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                            timeout=30, cwd=Path(__file__).resolve().parents[2])

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "nope.yaml: cannot read config" in result.stderr


def test_cli_check_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_TOKEN", "t")
    monkeypatch.setenv("VLLM_API_KEY", "k")
    path = write(tmp_path, DESIGN_EXAMPLE)

    assert main(["check-config", "--config", str(path)]) == 0

    assert "OK (1 LLM(s), 1 agent(s))" in capsys.readouterr().out


def test_cli_check_config_catches_a_server_with_the_v1_suffix(tmp_path, capsys):
    path = write(tmp_path, "server: http://127.0.0.1:8000/v1\ntoken: t\n"
                           "llms: [{name: my-echo, type: echo}]\n")

    assert main(["check-config", "--config", str(path)]) == 2

    assert capsys.readouterr().err == (
        f"error: {path}: server: must be Switchboard's base URL, without /v1 (the publisher "
        f"adds /api/v1 itself): use http://127.0.0.1:8000\n")
