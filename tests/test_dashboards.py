"""The shipped Grafana dashboards: only metric names we export, no hard-coded data source.

Every PromQL expression (panel targets and `label_values` variable queries) is parsed
with a real PromQL parser (PyPI `promql-parser`) after Grafana's variable substitution,
and each series it selects must be a sample name that server/metrics.py or
operator/metrics.py exposes. The live half, against a real Prometheus, is
tests/test_dashboards_prometheus.py; both use the helpers here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from modeldeploy.operator import metrics as operator_metrics
from modeldeploy.server import metrics as server_metrics
from prometheus_client import CollectorRegistry

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "charts" / "modeldeploy" / "dashboards"
#: dashboard file -> the metrics module whose names it may use.
SOURCES = {"model-serving.json": server_metrics, "operator.json": operator_metrics}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


def load(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARD_DIR / name).read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def query_variables(dashboard: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(variable name, label, series selector or None) of each `label_values` variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        assert match, f"variable {var['name']}: only label_values() queries are supported"
        out.append((var["name"], match.group(2), match.group(1)))
    return out


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m") -> str:
    """Grafana's variable interpolation for our dashboards ($x, ${x}, ${x:regex}, [[x]])."""
    builtins = {"__rate_interval": rate_interval, "__interval": rate_interval, "__range": "1h"}

    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in builtins:
            return builtins[name]
        if name not in values:
            raise KeyError(f"no value for variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def selected_series(expr: str) -> set[str]:
    """Names of all series a PromQL expression selects (parsed, not pattern-matched)."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exposed_series(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name a registry exposes -> the metric family it belongs to."""
    out = {}
    for family in registry.collect():
        suffixes = {
            "counter": ["_total", "_created"],
            "histogram": ["_bucket", "_sum", "_count", "_created"],
            "gauge": [""],
        }[family.type]
        exposed = family.name + ("_total" if family.type == "counter" else "")
        for suffix in suffixes:
            out[family.name + suffix] = exposed
    return out


def all_variables_as_all(dashboard: dict[str, Any]) -> dict[str, str]:
    """Values for every variable as if the user picked 'All' (the data source by its name)."""
    values = {"datasource": "prometheus"}
    for name, _label, _selector in query_variables(dashboard):
        values[name] = ".*"
    return values


def unknown_series(dashboard: dict[str, Any], registry: CollectorRegistry) -> dict[str, set[str]]:
    """PromQL in `dashboard` that selects a series `registry` does not expose, by panel."""
    exposed = exposed_series(registry)
    values = all_variables_as_all(dashboard)
    queries = [(title, substitute(e, values)) for title, e in panel_queries(dashboard)]
    for var, _label, selector in query_variables(dashboard):
        if selector:
            queries.append((f"variable {var}", substitute(selector, values)))
    bad: dict[str, set[str]] = {}
    for title, expr in queries:
        missing = {s for s in selected_series(expr) if s not in exposed}
        if missing:
            bad.setdefault(title, set()).update(missing)
    return bad


# ---------------------------------------------------------------------------- tests


def test_dashboards_shipped_are_exactly_the_known_ones() -> None:
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(SOURCES)
    uids = [load(name)["uid"] for name in SOURCES]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_promql_names_only_exported_metrics(name: str) -> None:
    assert unknown_series(load(name), SOURCES[name].REGISTRY) == {}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_exported_metric_appears_on_its_dashboard(name: str) -> None:
    """No metric is exported without a panel that shows it."""
    dashboard = load(name)
    values = all_variables_as_all(dashboard)
    exposed = exposed_series(SOURCES[name].REGISTRY)
    used = {
        exposed[s]
        for _t, e in panel_queries(dashboard)
        for s in selected_series(substitute(e, values))
    }
    assert used == set(SOURCES[name].METRIC_NAMES)


def test_metric_names_constants_match_the_registries() -> None:
    """METRIC_NAMES (what other code and docs rely on) equals what the registries expose."""
    for module in SOURCES.values():
        assert set(exposed_series(module.REGISTRY).values()) == set(module.METRIC_NAMES)


def test_checker_catches_a_drifted_metric_name() -> None:
    """The name check is live: a renamed metric in a panel or a variable is reported."""
    dashboard = load("model-serving.json")
    target = next(p for p in panels(dashboard) if p.get("targets"))
    target["targets"][0]["expr"] = 'sum(rate(vllm:request_success_total{model=~"$model"}[5m]))'
    dashboard["templating"]["list"][-1]["query"]["query"] = "label_values(modeldeploy_pods, pod)"
    assert unknown_series(dashboard, server_metrics.REGISTRY) == {
        target["title"]: {"vllm:request_success_total"},
        "variable pod": {"modeldeploy_pods"},
    }
    # The operator's dashboard is not allowed to borrow server metrics either.
    assert unknown_series(load("model-serving.json"), operator_metrics.REGISTRY)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_datasource_is_a_variable_never_a_hard_coded_uid(name: str) -> None:
    dashboard = load(name)
    [ds_var] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["name"] == "datasource" and ds_var["query"] == "prometheus"
    assert "__inputs" not in dashboard  # sidecar provisioning cannot fill ${DS_*} inputs

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    assert value == DATASOURCE, f"{path}.datasource = {value!r}"
                else:
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(dashboard, name)
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE and panel["targets"], panel["title"]


def test_serving_dashboard_has_model_and_pod_variables_and_the_required_panels() -> None:
    dashboard = load("model-serving.json")
    variables = {name: label for name, label, _ in query_variables(dashboard)}
    assert variables == {"namespace": "namespace", "model": "model", "pod": "pod"}
    for title, expr in panel_queries(dashboard):
        assert all(f'{v}=~"${v}"' in expr for v in variables), f"{title} ignores a variable"
    titles = {p["title"] for p in panels(dashboard)}
    assert {
        "Request rate by status",
        "Error ratio",
        "Time to first token",
        "Time per output token",
        "End-to-end request latency",
        "Tokens per second",
        "Running and waiting requests",
        "KV-cache usage",
        "Model load time",
        "Harvest time",
    } <= titles
    quantiles: dict[str, list[str]] = {}
    for title, expr in panel_queries(dashboard):
        quantiles.setdefault(title, []).extend(re.findall(r"histogram_quantile\((0\.\d+)", expr))
    for title in ("Time to first token", "Time per output token", "End-to-end request latency"):
        assert sorted(quantiles[title]) == ["0.5", "0.95", "0.99"], title


def test_operator_dashboard_panels() -> None:
    dashboard = load("operator.json")
    titles = {p["title"] for p in panels(dashboard)}
    assert {
        "ModelDeployments by phase",
        "Reconcile rate by result",
        "Reconcile error ratio",
        "Reconcile duration",
    } <= titles
