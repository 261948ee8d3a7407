"""The state one server process shares between its loader, signal handler and requests.

Request handlers ask the runtime for the engine (`require_engine`), which is where
"not ready yet", "draining" and "poisoned" become the 503s clients see, and for
the model-name check that makes an unknown model a 404. Keeping that in one object
(instead of module globals) lets tests build several apps in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeldeploy.server.http.admission import AdmissionGate
from modeldeploy.server.http.errors import ApiError
from modeldeploy.server.http.settings import ServeSettings
from modeldeploy.server.http.state import Lifecycle, Phase

if TYPE_CHECKING:  # the engine imports torch; the HTTP layer only holds a reference
    from modeldeploy.server.engine.engine import Engine
    from modeldeploy.server.harvest import HarvestResult

_MODEL_SUFFIXES = (".safetensors.index.json", ".safetensors", ".gguf")


def default_model_name(source: str) -> str:
    """The name clients use when `--served-model-name` is not given.

    hf://ORG/REPO[@REV] -> ORG/REPO (what vLLM and the OpenAI SDK examples use);
    a local file or directory -> its name without the weight suffix.
    """
    text = source.strip()
    if text.lower().startswith("hf://"):
        return text[5:].partition("@")[0].strip("/")
    name = Path(text.removeprefix("file://")).name
    lower = name.lower()
    for suffix in _MODEL_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)] or name
    return name or text


@dataclass
class ServerRuntime:
    """Settings, lifecycle, admission gate and (once loaded) the engine of this process."""

    settings: ServeSettings
    api_keys: frozenset[str] = frozenset()
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    engine: Engine | None = None
    harvest: HarvestResult | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0  # inference requests being answered (streams until their last byte)
    exit_code: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    gate: AdmissionGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = AdmissionGate(self.settings.max_concurrent, self.settings.max_queue)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or default_model_name(self.settings.source)

    @property
    def poisoned(self) -> bool:
        return bool(self.engine is not None and self.engine.poisoned)

    def check_model(self, requested: str | None) -> None:
        """404 unless the request names the served model (or names none)."""
        if requested and requested != self.model_name:
            raise ApiError(
                404,
                f"model {requested!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )

    def require_engine(self) -> Engine:
        """The engine, or the 503 that says why there is none to use right now."""
        phase = self.lifecycle.phase
        if phase is Phase.DRAINING:
            raise ApiError(503, "server is shutting down (draining)", code="draining")
        if phase is Phase.FAILED:
            reason = self.lifecycle.reason or "unknown reason"
            raise ApiError(503, f"model failed to load: {reason}", code="load_failed")
        if self.engine is None or phase is not Phase.READY:
            raise ApiError(
                503,
                f"model {self.model_name!r} is not ready yet ({phase.value})",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        if self.engine.poisoned:
            reason = getattr(self.engine, "poison_reason", None) or "device error"
            raise ApiError(503, f"model is poisoned: {reason}", code="model_poisoned")
        return self.engine
