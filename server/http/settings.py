"""`modeldeploy serve` options: each a flag and a `MODELDEPLOY_<NAME>` variable, defined once.

The operator configures pods through environment variables and humans through
flags, so both must mean exactly the same thing. Every option is declared once in
`OPTIONS`; argparse gets flags whose default is "not given", and
`settings_from_args` resolves flag > environment > default, converting and
checking each value so a bad one is a one-line error naming the flag or the
variable (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeldeploy.server.contract import DEFAULT_HOST, ENV_PREFIX, SERVER_PORT, default_slug_root
from modeldeploy.server.errors import UserInputError

MiB = 1024 * 1024

#: Overrides where the failure reason is written (Kubernetes reads /dev/termination-log).
TERMINATION_LOG_ENV = f"{ENV_PREFIX}TERMINATION_LOG"
#: TEST ONLY: seconds to sleep in the `loading` phase, so tests can watch /ready say 503.
TEST_LOAD_DELAY_ENV = f"{ENV_PREFIX}TEST_LOAD_DELAY"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE - {''})}")


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("expected a number") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535 (0 picks a free port)")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


def _byte_size(text: str) -> int:
    """`4194304`, `4MiB`, `512KiB`, `1GiB` (binary units; plain numbers are bytes)."""
    units = {"kib": 1024, "mib": MiB, "gib": 1024 * MiB, "kb": 1000, "mb": 10**6, "gb": 10**9}
    low = text.strip().lower()
    for suffix, factor in units.items():
        if low.endswith(suffix):
            value = int(_float(low.removesuffix(suffix)) * factor)
            break
    else:
        value = _int(low)
    if value < 1:
        raise ValueError("must be at least 1 byte")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return convert


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


@dataclass(frozen=True)
class Option:
    """One serve option: flag name, converter, default, help, and how argparse takes it."""

    name: str  # flag without dashes, e.g. "max-queue"; env is MODELDEPLOY_MAX_QUEUE
    convert: Callable[[str], Any]
    default: Any
    help: str
    kind: str = "value"  # "value", "bool" (--x/--no-x) or "flag" (--x only)
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", _text, DEFAULT_HOST, "address to bind (the pod passes 0.0.0.0)"),
    Option("port", _port, SERVER_PORT, "TCP port to listen on (0 picks a free one)"),
    Option("served-model-name", _text, None, "model name clients use (default: from SOURCE)"),
    Option("dtype", _choice("auto", "float32", "bfloat16", "float16"), "auto", "weight dtype"),
    Option("device", _choice("auto", "cpu", "cuda"), "auto", "where the model runs"),
    Option("no-gpu", _boolean, False, "never use a GPU (same as --device cpu)", kind="flag"),
    Option("max-concurrent", _positive_int, 10, "sequences generating at once"),
    Option("max-queue", _non_negative_int, 64, "requests allowed to wait; more get 429"),
    Option("timeout", _positive_float, 300.0, "seconds per request before 504", metavar="SECONDS"),
    Option("max-prompt-tokens", _positive_int, 16384, "longest prompt accepted (tokens)"),
    Option("max-model-len", _positive_int, None, "context length (default: the model's)"),
    Option("prefill-chunk", _positive_int, 512, "prompt tokens per prefill step"),
    Option(
        "compile",
        _boolean,
        True,
        "compile the decode step with torch.compile once ready (CPU, needs g++)",
        kind="bool",
    ),
    Option("chat-template", _existing_file, None, "Jinja chat template file to use instead"),
    Option("max-body-bytes", _byte_size, 4 * MiB, "largest request body; more gets 413"),
    Option("drain-timeout", _positive_float, 30.0, "seconds SIGTERM waits for in-flight requests"),
    Option("cors", _boolean, True, "send CORS headers (any origin)", kind="bool"),
    Option("metrics", _boolean, True, "serve Prometheus metrics on /metrics", kind="bool"),
    Option("api-key-file", _existing_file, None, "file of API keys (one a line) for Bearer auth"),
    Option("slug-root", _path, None, "slug directories (default $MODELDEPLOY_CACHE/slugs)"),
    Option("cache-dir", _path, None, "Hugging Face cache for hf:// sources"),
    Option("revision", _text, None, "revision (branch, tag, commit) of an hf:// source"),
    Option("quant", _text, None, "pick the .gguf whose name contains this (e.g. Q4_K_M)"),
    Option("log-level", _choice("debug", "info", "warning", "error"), "info", "log verbosity"),
)
OPTIONS_BY_DEST: dict[str, Option] = {opt.dest: opt for opt in OPTIONS}
SOURCE_ENV = f"{ENV_PREFIX}SOURCE"


@dataclass(frozen=True)
class ServeSettings:
    """The resolved serve options (flag > environment > default), all checked."""

    source: str
    host: str = DEFAULT_HOST
    port: int = SERVER_PORT
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    no_gpu: bool = False
    max_concurrent: int = 10
    max_queue: int = 64
    timeout: float = 300.0
    max_prompt_tokens: int = 16384
    max_model_len: int | None = None
    prefill_chunk: int = 512
    compile: bool = True
    chat_template: Path | None = None
    max_body_bytes: int = 4 * MiB
    drain_timeout: float = 30.0
    cors: bool = True
    metrics: bool = True
    api_key_file: Path | None = None
    slug_root: Path = field(default_factory=default_slug_root)
    cache_dir: Path | None = None
    revision: str | None = None
    quant: str | None = None
    log_level: str = "info"

    @property
    def engine_device(self) -> str:
        """The device handed to the engine: `--no-gpu` forces cpu."""
        return "cpu" if self.no_gpu else self.device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare SOURCE and every option; defaults stay None so the environment can fill in."""
    parser.add_argument(
        "source",
        nargs="?",
        default=None,
        metavar="SOURCE",
        help=f"model: /path, file:///path or hf://ORG/REPO[@REV] (env {SOURCE_ENV})",
    )
    for opt in OPTIONS:
        default = "none" if opt.default is None else opt.default
        help_text = f"{opt.help} (env {opt.env}; default {default})"
        if opt.kind == "bool":
            parser.add_argument(
                f"--{opt.name}",
                dest=opt.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif opt.kind == "flag":
            parser.add_argument(
                f"--{opt.name}",
                dest=opt.dest,
                action="store_const",
                const=True,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                f"--{opt.name}", dest=opt.dest, default=None, metavar=opt.metavar, help=help_text
            )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Resolve each option: the flag if given, else MODELDEPLOY_<NAME>, else the default."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        given = getattr(args, opt.dest, None)
        if given is not None and not isinstance(given, str):
            values[opt.dest] = given  # boolean flags arrive already converted
            continue
        raw, origin = (given, f"--{opt.name}") if given is not None else (env.get(opt.env), opt.env)
        if raw is None:
            if opt.default is not None:
                values[opt.dest] = opt.default
            continue
        try:
            values[opt.dest] = opt.convert(raw)
        except ValueError as exc:
            raise UserInputError(f"{origin}={raw!r}: {exc}") from None
    source = args.source or env.get(SOURCE_ENV)
    if not source:
        raise UserInputError(f"no model source: pass SOURCE or set {SOURCE_ENV}")
    if values.get("no_gpu") and values.get("device") == "cuda":
        raise UserInputError("--no-gpu and --device cuda contradict each other")
    return ServeSettings(source=source, **values)


def read_api_keys(path: Path | None) -> frozenset[str]:
    """The accepted Bearer keys: one per non-empty line (empty file is a mistake, not 'open')."""
    if path is None:
        return frozenset()
    try:
        keys = frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"--api-key-file {path}: cannot read: {exc}") from None
    if not keys:
        raise UserInputError(f"--api-key-file {path}: holds no key")
    return keys
