"""Every Prometheus metric the operator exports, defined once (the chart's
Operator dashboard queries these names; a test checks it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "modeldeploy_operator_"

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    f"{PREFIX}reconciles_total",
    "Reconciles of ModelDeployments by handler and result (success, retry, error).",
    ["handler", "result"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    f"{PREFIX}reconcile_duration_seconds",
    "Duration of one reconcile.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
MODELDEPLOYMENTS = Gauge(
    f"{PREFIX}modeldeployments",
    "ModelDeployments known to this operator, by phase.",
    ["phase"],
    registry=REGISTRY,
)

METRIC_NAMES: frozenset[str] = frozenset(
    {
        f"{PREFIX}reconciles_total",
        f"{PREFIX}reconcile_duration_seconds",
        f"{PREFIX}modeldeployments",
    }
)
