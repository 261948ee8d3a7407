"""Every Prometheus metric the server exports, defined once.

The HTTP layer records into these; the Grafana dashboards in the chart query
them, and a test checks that every PromQL expression there names a metric
defined here. Labels are kept low-cardinality: model name, endpoint path
template, status code; never a request id or a prompt.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "modeldeploy_"

#: The server's own registry, so tests and embedders get no foreign collectors.
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

REQUESTS = Counter(
    f"{PREFIX}requests_total",
    "HTTP inference requests by model, endpoint and status code.",
    ["model", "endpoint", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    f"{PREFIX}request_duration_seconds",
    "End-to-end request duration.",
    ["model", "endpoint"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    f"{PREFIX}time_to_first_token_seconds",
    "Time from request arrival to its first generated token.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    f"{PREFIX}time_per_output_token_seconds",
    "Mean time between generated tokens of a request, after the first.",
    ["model"],
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    f"{PREFIX}request_queue_seconds",
    "Time a request waited before the scheduler admitted it.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    f"{PREFIX}prompt_tokens",
    "Prompt tokens processed.",
    ["model"],
    registry=REGISTRY,
)
GENERATION_TOKENS = Counter(
    f"{PREFIX}generation_tokens",
    "Tokens generated.",
    ["model"],
    registry=REGISTRY,
)
REQUESTS_RUNNING = Gauge(
    f"{PREFIX}requests_running",
    "Sequences generating now.",
    ["model"],
    registry=REGISTRY,
)
REQUESTS_WAITING = Gauge(
    f"{PREFIX}requests_waiting",
    "Requests waiting for a generation slot.",
    ["model"],
    registry=REGISTRY,
)
KV_CACHE_USAGE = Gauge(
    f"{PREFIX}kv_cache_usage_ratio",
    "Fraction of the KV cache in use (0..1).",
    ["model"],
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    f"{PREFIX}model_load_seconds",
    "Seconds the last model load took (weights to device, warm-up excluded).",
    ["model"],
    registry=REGISTRY,
)
HARVEST_SECONDS = Gauge(
    f"{PREFIX}harvest_seconds",
    "Seconds the last harvest took (fetch plus slug directory).",
    ["model"],
    registry=REGISTRY,
)
HARVEST_FILES = Gauge(
    f"{PREFIX}harvest_files",
    "Sibling files linked into the slug directory by the last harvest.",
    ["model"],
    registry=REGISTRY,
)
MODEL_INFO = Gauge(
    f"{PREFIX}model_info",
    "Always 1; labels describe the loaded model.",
    ["model", "format", "architecture", "dtype", "device"],
    registry=REGISTRY,
)
MODEL_POISONED = Gauge(
    f"{PREFIX}model_poisoned",
    "1 when a device error has poisoned the model and the container must restart.",
    ["model"],
    registry=REGISTRY,
)

#: The exposed names (counters carry the `_total` suffix prometheus-client adds).
METRIC_NAMES: frozenset[str] = frozenset(
    {
        f"{PREFIX}requests_total",
        f"{PREFIX}request_duration_seconds",
        f"{PREFIX}time_to_first_token_seconds",
        f"{PREFIX}time_per_output_token_seconds",
        f"{PREFIX}request_queue_seconds",
        f"{PREFIX}prompt_tokens_total",
        f"{PREFIX}generation_tokens_total",
        f"{PREFIX}requests_running",
        f"{PREFIX}requests_waiting",
        f"{PREFIX}kv_cache_usage_ratio",
        f"{PREFIX}model_load_seconds",
        f"{PREFIX}harvest_seconds",
        f"{PREFIX}harvest_files",
        f"{PREFIX}model_info",
        f"{PREFIX}model_poisoned",
    }
)
