"""`modeldeploy serve` options: every DESIGN.md flag exists and has a MODELDEPLOY_* twin."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from modeldeploy.server.contract import DEFAULT_HOST, SERVER_PORT
from modeldeploy.server.errors import UserInputError
from modeldeploy.server.http import settings as serve_settings
from modeldeploy.server.http.runtime import default_model_name

#: The serve options DESIGN.md lists, as flags (the contract this test pins).
DESIGN_FLAGS = [
    "--served-model-name",
    "--dtype",
    "--device",
    "--no-gpu",
    "--max-concurrent",
    "--max-queue",
    "--timeout",
    "--max-prompt-tokens",
    "--max-model-len",
    "--prefill-chunk",
    "--chat-template",
    "--max-body-bytes",
    "--drain-timeout",
    "--cors",
    "--no-cors",
    "--metrics",
    "--no-metrics",
    "--api-key-file",
    "--slug-root",
    "--cache-dir",
    "--revision",
    "--quant",
    "--host",
    "--port",
]


def _parse(argv: list[str], env: dict[str, str] | None = None) -> serve_settings.ServeSettings:
    parser = argparse.ArgumentParser()
    serve_settings.add_arguments(parser)
    return serve_settings.settings_from_args(parser.parse_args(argv), environ=env or {})


def test_every_design_flag_is_accepted_and_documented_with_its_env_var() -> None:
    parser = argparse.ArgumentParser()
    serve_settings.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for flag in DESIGN_FLAGS:
        assert flag in help_text, flag
    for opt in serve_settings.OPTIONS:
        assert opt.env in help_text, opt.env


def test_defaults_match_design() -> None:
    s = _parse(["/m.gguf"])
    assert (s.host, s.port) == (DEFAULT_HOST, SERVER_PORT)
    assert (s.max_concurrent, s.max_queue, s.timeout) == (10, 64, 300.0)
    assert (s.max_prompt_tokens, s.prefill_chunk, s.drain_timeout) == (16384, 512, 30.0)
    assert s.max_body_bytes == 4 * 1024 * 1024
    assert s.cors and s.metrics and not s.no_gpu
    assert s.dtype == s.device == "auto"


@pytest.mark.parametrize(
    ("option", "raw", "attr", "expected"),
    [
        ("served-model-name", "my-model", "served_model_name", "my-model"),
        ("dtype", "bfloat16", "dtype", "bfloat16"),
        ("device", "cpu", "device", "cpu"),
        ("no-gpu", "true", "no_gpu", True),
        ("max-concurrent", "3", "max_concurrent", 3),
        ("max-queue", "0", "max_queue", 0),
        ("timeout", "2.5", "timeout", 2.5),
        ("max-prompt-tokens", "100", "max_prompt_tokens", 100),
        ("max-model-len", "256", "max_model_len", 256),
        ("prefill-chunk", "64", "prefill_chunk", 64),
        ("max-body-bytes", "1MiB", "max_body_bytes", 1024 * 1024),
        ("drain-timeout", "5", "drain_timeout", 5.0),
        ("cors", "false", "cors", False),
        ("metrics", "0", "metrics", False),
        ("slug-root", "/tmp/slugs", "slug_root", Path("/tmp/slugs")),
        ("cache-dir", "/tmp/hub", "cache_dir", Path("/tmp/hub")),
        ("revision", "v1", "revision", "v1"),
        ("quant", "Q4_K_M", "quant", "Q4_K_M"),
        ("host", "0.0.0.0", "host", "0.0.0.0"),
        ("port", "9000", "port", 9000),
        ("log-level", "debug", "log_level", "debug"),
    ],
)
def test_each_option_reads_its_environment_variable(
    option: str, raw: str, attr: str, expected: object
) -> None:
    env_name = "MODELDEPLOY_" + option.replace("-", "_").upper()
    assert getattr(_parse(["/m.gguf"], {env_name: raw}), attr) == expected


def test_flag_beats_environment(tmp_path: Path) -> None:
    s = _parse(
        ["/m.gguf", "--max-queue", "5", "--cors"],
        {"MODELDEPLOY_MAX_QUEUE": "9", "MODELDEPLOY_CORS": "false"},
    )
    assert s.max_queue == 5 and s.cors is True
    s = _parse(["/m.gguf", "--no-metrics"], {"MODELDEPLOY_METRICS": "true"})
    assert s.metrics is False


def test_source_from_environment_and_missing_source() -> None:
    assert _parse([], {"MODELDEPLOY_SOURCE": "hf://org/repo"}).source == "hf://org/repo"
    with pytest.raises(UserInputError, match="MODELDEPLOY_SOURCE"):
        _parse([], {})


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["/m", "--port", "70000"], {}, "--port='70000'"),
        (["/m"], {"MODELDEPLOY_MAX_CONCURRENT": "zero"}, "MODELDEPLOY_MAX_CONCURRENT='zero'"),
        (["/m"], {"MODELDEPLOY_DTYPE": "int4"}, "MODELDEPLOY_DTYPE='int4'"),
        (["/m"], {"MODELDEPLOY_CORS": "maybe"}, "MODELDEPLOY_CORS='maybe'"),
        (["/m", "--timeout", "-1"], {}, "--timeout='-1'"),
        (["/m", "--chat-template", "/no/such/file.jinja"], {}, "--chat-template"),
        (["/m", "--no-gpu", "--device", "cuda"], {}, "--no-gpu"),
    ],
)
def test_bad_values_name_the_flag_or_variable(
    argv: list[str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(UserInputError, match=named.replace("(", r"\(").replace("[", r"\[")):
        _parse(argv, env)


def test_no_gpu_means_cpu() -> None:
    assert _parse(["/m", "--no-gpu"]).engine_device == "cpu"
    assert _parse(["/m", "--device", "cpu"]).engine_device == "cpu"
    assert _parse(["/m"]).engine_device == "auto"


def test_api_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alpha\n\n  beta  \n")
    assert serve_settings.read_api_keys(keys) == {"alpha", "beta"}
    keys.write_text("\n")
    with pytest.raises(UserInputError, match="holds no key"):
        serve_settings.read_api_keys(keys)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("hf://Qwen/Qwen2.5-0.5B-Instruct@main", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("/models/qwen2.5-coder-0.5b-instruct-q8_0.gguf", "qwen2.5-coder-0.5b-instruct-q8_0"),
        ("file:///m/tiny-llama", "tiny-llama"),
        ("/m/model.safetensors.index.json", "model"),
    ],
)
def test_default_served_model_name(source: str, name: str) -> None:
    assert default_model_name(source) == name


def test_cli_bad_environment_is_exit_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modeldeploy.server.cli", "serve", "/m.gguf"],
        env={"MODELDEPLOY_MAX_QUEUE": "-3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "MODELDEPLOY_MAX_QUEUE='-3'" in result.stderr
