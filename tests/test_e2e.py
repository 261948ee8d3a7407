"""End to end: `kubectl apply` of the example manifest to an answered OpenAI request, and back.

The strict API emulator (tests/kube) serves the real kubectl; the real operator
reconciles in-process; the fake node of tests/e2e runs the Deployment the
operator generated: `modeldeploy harvest` as the init container, then
`modeldeploy serve`, as real processes with the pod's env, volumes, ports and
probes, and kube-proxy for the Service. A tiny generated model lies on the
"claim" at the path examples/tiny-local.yaml names, so the example is applied
as it is.

The tests run in order on one cluster and share its state: apply the example
-> its slug directory -> OpenAI through the Service -> scale to 2 -> SIGKILL a
server -> roll a spec change, scale to 1 -> refuse an invalid manifest -> a
second ModelDeployment whose source is missing -> delete both. Two tests check
the fake node itself: the translation of the operator's pod spec (Secrets,
volumes, ports) and the restart of a container that fails its liveness probe.
A failure early on makes the later tests fail too; the first failure is the one
to read (its message carries the containers' logs where that helps).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import yaml
from e2e.informer import Informer
from e2e.kubectl import Kubectl
from e2e.kubelet import FakeKubelet
from e2e.launch import Launch
from e2e.pods import PodRunner
from e2e.service_proxy import ServiceProxy
from fixtures.tiny_models import copy_model
from kube.cluster import Cluster
from kube.cluster import wait_for as cluster_wait_for
from kube.operator_runner import OperatorRunner
from modeldeploy.operator.builders import HARVEST_CONTAINER, SERVER_CONTAINER, build_deployment
from modeldeploy.operator.spec import parse_spec
from modeldeploy.server.contract import MODELS_MOUNT, SERVICE_PORT
from modeldeploy.server.harvest import WEIGHT_SUFFIXES, read_record
from modeldeploy.server.http.settings import TERMINATION_LOG_ENV
from modeldeploy.server.slug import slug_for
from modeldeploy.server.sources import parse_source
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "tiny-local.yaml"
NAMESPACE = "default"
MD_PATH = "/apis/modeldeploy.dev/v1alpha1/modeldeployments"
#: Generous: two server processes import torch at once on a shared 2-core machine.
READY_TIMEOUT_S = 150.0

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T],
    what: str,
    timeout: float = READY_TIMEOUT_S,
    diagnose: Callable[[], str] = lambda: "",
) -> T:
    """kube.cluster.wait_for at kubectl's pace, with the node's logs when it times out."""
    try:
        return cluster_wait_for(probe, timeout=timeout, interval=0.25, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose()}") from None


@dataclass
class World:
    """One emulated cluster with the operator, a fake node and kubectl, for the whole module."""

    cluster: Cluster
    kubelet: FakeKubelet
    proxy: ServiceProxy
    kubectl: Kubectl
    example: dict[str, Any]
    phases: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.example["metadata"]["name"])

    def record(self, kind: str, obj: dict[str, Any]) -> None:
        """Informer listener: every phase an object's status passes through, in order."""
        phase = (obj.get("status") or {}).get("phase")
        seen = self.phases.setdefault(obj["metadata"]["name"], [])
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)

    @property
    def served_name(self) -> str:
        return str(self.example["spec"]["model"]["servedName"])

    def openai(self) -> openai.OpenAI:
        """An OpenAI client for the Service of the example, through the fake kube-proxy."""
        port = self.proxy.port(NAMESPACE, self.name, SERVICE_PORT)
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    def md(self, name: str | None = None) -> dict[str, Any]:
        return self.kubectl.json("get", "md", name or self.name)

    def status(self, name: str | None = None) -> dict[str, Any]:
        return self.md(name).get("status") or {}

    def servers(self, name: str | None = None) -> list[PodRunner]:
        return self.kubelet.pods_of(NAMESPACE, name or self.name)

    def server_processes(self, name: str | None = None) -> list[int]:
        pids = []
        for runner in self.servers(name):
            container = runner.containers[SERVER_CONTAINER]
            if container.running and container.proc is not None:
                pids.append(container.proc.pid)
        return pids

    def logs(self) -> str:
        """Every container log of the fake node (for assertion messages)."""
        out = []
        for runner in self.kubelet.all_runners():
            for container in runner.containers.values():
                for path in sorted((runner.dir / "logs").glob(f"{container.name}-*.log")):
                    text = path.read_text(errors="replace")[-1500:]
                    out.append(f"--- {runner.name}/{path.name}\n{text}")
        return "\n".join(out) or "(no container ran)"


def served_requests(runner: PodRunner) -> float:
    """modeldeploy_requests_total summed over its labels, read from one pod's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{runner.local_port('http')}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modeldeploy_requests_total"
    )


def in_order(seen: list[str], expected: list[str]) -> bool:
    """Whether `expected` occurs in `seen` in order (other phases may lie in between)."""
    it = iter(seen)
    return all(phase in it for phase in expected)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any) -> Iterator[World]:
    root = tmp_path_factory.mktemp("e2e")
    example = yaml.safe_load(EXAMPLE.read_text())
    with (
        Cluster() as cluster,
        OperatorRunner(cluster.url, [NAMESPACE]),
        FakeKubelet(cluster.url, root / "node") as kubelet,
        ServiceProxy(kubelet) as proxy,
    ):
        (root / "kube").mkdir()
        kubectl = Kubectl(cluster.kubeconfig(root / "kube" / "config"))
        world = World(cluster, kubelet, proxy, kubectl, example)
        recorder = Informer(cluster.url, MD_PATH, listener=world.record).start()
        # The claim the example mounts, with the tiny model where its source points.
        claim = example["spec"]["storage"]["claim"]["name"]
        source_path = example["spec"]["model"]["source"].removeprefix("file://")
        in_claim = Path(source_path).relative_to(MODELS_MOUNT)
        copy_model(tiny_models.hf("llama"), kubelet.claim_dir(NAMESPACE, claim) / in_claim)
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": NAMESPACE},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        (root / "pvc.yaml").write_text(yaml.safe_dump(pvc))
        kubectl("apply", "-f", str(root / "pvc.yaml"))
        try:
            yield world
        finally:
            recorder.stop()


def test_apply_goes_pending_harvesting_loading_ready(world: World) -> None:
    started = time.monotonic()
    out = world.kubectl("apply", "-f", str(EXAMPLE))
    assert f"modeldeployment.modeldeploy.dev/{world.name} created" in out

    status = wait_for(
        lambda: (s := world.status()).get("phase") == "Ready" and s,
        f"{world.name} Ready",
        diagnose=world.logs,
    )
    elapsed = time.monotonic() - started
    phases = world.phases[world.name]
    assert in_order(phases, ["Pending", "Harvesting", "Loading", "Ready"]), phases
    assert "Failed" not in phases, (phases, world.logs())
    assert status["readyReplicas"] == 1 and status["replicas"] == 1
    print(f"apply -> Ready in {elapsed:.1f}s via {phases}")

    # `kubectl get md`: the printer columns, filled from spec and status.
    output = world.kubectl("get", "md")
    print(output)
    table = output.splitlines()
    assert table[0].split() == ["NAME", "SOURCE", "REPLICAS", "READY", "PHASE", "AGE"]
    row = next(line.split() for line in table[1:] if line.split()[0] == world.name)
    assert row[1:5] == [world.example["spec"]["model"]["source"], "1", "1", "Ready"]

    # An Event for each phase change, on the ModelDeployment.
    events = world.kubectl.json(
        "get", "events", "--field-selector", f"involvedObject.name={world.name}"
    )["items"]
    reasons = [
        e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))
    ]
    assert in_order(reasons, ["Harvesting", "Loading", "Ready"]), reasons


def test_slug_directory_on_the_shared_volume_has_the_harvested_siblings(world: World) -> None:
    spec = world.example["spec"]
    claim_dir = world.kubelet.claim_dir(NAMESPACE, spec["storage"]["claim"]["name"])
    in_pod = spec["model"]["source"]
    model_dir = claim_dir / Path(in_pod.removeprefix("file://")).relative_to(MODELS_MOUNT)
    # The operator names the slug of the source as the pod sees it; the fake node maps
    # /models to a host directory, so the harvest hashed the host path instead: the readable
    # part of the slug is the same, its hash is the one of the mapped path.
    assert world.status()["slug"] == slug_for(parse_source(in_pod))
    slug = slug_for(parse_source(f"file://{model_dir}"))
    assert slug.rsplit("--", 1)[0] == world.status()["slug"].rsplit("--", 1)[0]
    slug_dir = claim_dir / "slugs" / slug
    assert [p.name for p in (claim_dir / "slugs").iterdir()] == [slug]
    record = read_record(slug_dir)
    assert record is not None, "the harvest's completion record is missing"
    siblings = sorted(
        p.name for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
    )
    assert "config.json" in siblings and "tokenizer.json" in siblings
    linked = {p.name: p for p in slug_dir.iterdir() if p.is_symlink()}
    assert sorted(linked) == siblings == sorted(record.linked_files)
    for name, link in linked.items():
        assert Path(os.readlink(link)) == (model_dir / name).resolve()
    assert not any(p.name.endswith(WEIGHT_SUFFIXES) for p in slug_dir.iterdir())


def test_openai_client_through_the_service(world: World) -> None:
    client = world.openai()
    served = world.served_name
    assert [m.id for m in client.models.list().data] == [served]
    completion = client.completions.create(model=served, prompt="Hello", max_tokens=4)
    choice = completion.choices[0]
    assert isinstance(choice.text, str)
    assert choice.finish_reason in ("length", "stop")
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 4
    chat = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens >= 1


def test_fake_kubelet_runs_the_operators_pod_spec_with_secrets_volumes_and_ports(
    world: World, tmp_path: Path
) -> None:
    """The translation the fake node applies to the Deployment the operator builds."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf-token", "namespace": NAMESPACE},
        "stringData": {"token": "s3cret"},
    }
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(secret))
    # apply, not `kubectl create secret`: that one sends protobuf, which the emulator lacks.
    world.kubectl("apply", "-f", str(tmp_path / "secret.yaml"))
    body = json.loads(json.dumps(world.example))
    body["metadata"].update(namespace=NAMESPACE, uid="uid-1", generation=1)
    body["spec"]["hfTokenSecretRef"] = {"name": "hf-token"}
    template = build_deployment(parse_spec(body))["spec"]["template"]
    pod = {"metadata": {"name": "translated-0", "namespace": NAMESPACE}, "spec": template["spec"]}
    runner = PodRunner(world.kubelet, pod)
    try:
        launches = runner.dry_run()
        claim = world.kubelet.claim_dir(NAMESPACE, body["spec"]["storage"]["claim"]["name"])
        in_pod = Path(body["spec"]["model"]["source"].removeprefix("file://"))
        source = f"file://{claim / in_pod.relative_to(MODELS_MOUNT)}"
        for name, command in ((HARVEST_CONTAINER, "harvest"), (SERVER_CONTAINER, "serve")):
            launch = launches[name]
            assert isinstance(launch, Launch), launch
            assert launch.env["HF_TOKEN"] == "s3cret"  # on both containers, from the Secret
            assert launch.env["HF_HUB_CACHE"] == str(claim / "hub")
            assert launch.env["HOME"] == str(runner.dir / "volumes" / "tmp")
            assert launch.argv[0] == str(Path(sys.prefix) / "bin" / "modeldeploy")
            assert launch.argv[1:3] == [command, source]  # /models/... mapped onto the claim
            assert launch.env[TERMINATION_LOG_ENV] == str(launch.termination_log)
            assert launch.termination_log.is_relative_to(runner.dir)
        server = launches[SERVER_CONTAINER]
        assert isinstance(server, Launch)
        port = server.argv[server.argv.index("--port") + 1]
        assert port == str(runner.local_port("http")) != "8080"
        assert server.argv[server.argv.index("--host") + 1] == "127.0.0.1"
        assert server.ports["http"] == int(port)

        world.kubectl("delete", "secret", "hf-token")
        waiting = runner.dry_run()[HARVEST_CONTAINER]
        assert waiting == {
            "waiting": {
                "reason": "CreateContainerConfigError",
                "message": 'secret "hf-token" not found',
            }
        }
    finally:
        runner.close()


def test_kubectl_scale_runs_two_servers(world: World) -> None:
    out = world.kubectl("scale", f"md/{world.name}", "--replicas=2")
    assert "scaled" in out
    status = wait_for(
        lambda: (s := world.status()).get("readyReplicas") == 2 and s.get("phase") == "Ready" and s,
        "2 ready replicas",
        diagnose=world.logs,
    )
    assert status["replicas"] == 2
    pids = world.server_processes()
    assert len(set(pids)) == 2, (pids, world.logs())
    deployment = world.kubectl.json("get", "deployment", world.name)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["status"]["readyReplicas"] == 2
    table = world.kubectl("get", "md", world.name).splitlines()
    assert table[1].split()[2:5] == ["2", "2", "Ready"]

    # The Service spreads connections over both ready replicas (like kube-proxy, per
    # connection: one kept-alive client connection stays on one pod), each counts its own.
    before = {r.name: served_requests(r) for r in world.servers()}
    port = world.proxy.port(NAMESPACE, world.name, SERVICE_PORT)
    body = {"model": world.served_name, "prompt": "Hi", "max_tokens": 1}
    for _ in range(4):
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        response.raise_for_status()
    after = {r.name: served_requests(r) for r in world.servers()}
    assert all(after[name] - before[name] >= 1 for name in before), (before, after)


def test_sigkilled_server_is_restarted_and_ready_again(world: World) -> None:
    runner = world.servers()[0]
    before = len(world.phases[world.name])
    victim = runner.containers[SERVER_CONTAINER].proc
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)

    wait_for(lambda: world.status().get("phase") != "Ready", "the phase to leave Ready", 30)
    wait_for(
        lambda: (s := world.status()).get("phase") == "Ready" and s.get("readyReplicas") == 2,
        "Ready again with 2 replicas",
        diagnose=world.logs,
    )
    after_kill = world.phases[world.name][before:]
    print(f"phases after SIGKILL: {after_kill}")
    assert after_kill[-1] == "Ready"
    assert set(after_kill[:-1]) & {"Degraded", "Loading"}, after_kill
    pod = world.kubectl.json("get", "pod", runner.name)
    server = next(c for c in pod["status"]["containerStatuses"] if c["name"] == SERVER_CONTAINER)
    assert server["restartCount"] == 1
    assert server["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
    assert server["ready"] is True
    restarted = runner.containers[SERVER_CONTAINER].proc
    assert restarted is not None and restarted.pid != victim.pid and restarted.poll() is None


def test_spec_change_rolls_the_pods_and_scale_down_stops_one(world: World) -> None:
    old_pids = set(world.server_processes())
    generation = world.md()["metadata"]["generation"]
    before = len(world.phases[world.name])
    world.kubectl(
        "patch", "md", world.name, "--type=merge", "-p", '{"spec":{"server":{"maxConcurrent":3}}}'
    )

    def rolled() -> bool:
        md = world.md()
        status = md.get("status") or {}
        pids = set(world.server_processes())
        return (
            status.get("observedGeneration") == md["metadata"]["generation"] > generation
            and status.get("phase") == "Ready"
            and status.get("readyReplicas") == 2
            and len(pids) == 2
            and not pids & old_pids
        )

    wait_for(rolled, "new pods for the new spec", diagnose=world.logs)
    # The old pods served until the new ones were ready: the phase never left Ready.
    assert set(world.phases[world.name][before:]) <= {"Ready"}, world.phases[world.name]
    for runner in world.servers():
        launch = runner.containers[SERVER_CONTAINER].launch
        assert launch is not None
        assert launch.argv[launch.argv.index("--max-concurrent") + 1] == "3"

    runners = world.servers()
    world.kubectl("scale", f"md/{world.name}", "--replicas=1")
    wait_for(
        lambda: (
            len(world.server_processes()) == 1
            and (s := world.status()).get("replicas") == 1
            and s.get("readyReplicas") == 1
            and s.get("phase") == "Ready"
        ),
        "one replica left",
        60,
    )
    stopped = [r for r in runners if r.stopping]
    assert len(stopped) == 1
    stopped[0].join(30)
    assert all(not c.running for c in stopped[0].containers.values())


def test_kubectl_apply_refuses_an_invalid_manifest_naming_the_field(
    world: World, tmp_path: Path
) -> None:
    """kubectl asks for server-side field validation; the emulator's CRD rules answer."""
    typo = json.loads(json.dumps(world.example))
    typo["metadata"]["name"] = "tiny-typo"
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(typo))
    refused = world.kubectl.run("apply", "-f", str(path), check=False)
    assert refused.returncode != 0
    assert "spec.replica" in refused.stderr, refused.stderr
    assert world.kubectl.run("get", "md", "tiny-typo", check=False).returncode != 0


def test_missing_source_fails_with_the_harvest_error(world: World, tmp_path: Path) -> None:
    manifest = json.loads(json.dumps(world.example))
    name = "tiny-missing"
    manifest["metadata"]["name"] = name
    manifest["spec"]["model"]["source"] = "file:///models/local/does-not-exist"
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(manifest))
    world.kubectl("apply", "-f", str(path))

    status = wait_for(lambda: (s := world.status(name)).get("phase") == "Failed" and s, "Failed")
    runner = world.servers(name)[0]
    first_run = runner.dir / "logs" / f"{HARVEST_CONTAINER}-1.log"
    own_error = first_run.read_text().strip().splitlines()[-1]  # what harvest printed itself
    assert "modeldeploy harvest: error:" in own_error and "does-not-exist" in own_error
    assert own_error in status["message"]

    # The kubelet retries the init container (CrashLoopBackOff); while it is backing off the
    # phase is Failed and `kubectl describe` shows the harvest's words in status and Events.
    def described_failed() -> str | None:
        text = world.kubectl("describe", "md", name)
        status_part, _, events = text.partition("\nEvents:")
        failed = re.search(r"^\s+Phase:\s+Failed$", status_part, re.MULTILINE)
        return text if failed and own_error in status_part and own_error in events else None

    describe = wait_for(described_failed, "describe to show the failed harvest", 60)
    print(describe)
    events = describe.partition("\nEvents:")[2]
    assert re.search(r"Warning\s+Failed\s+\S+\s+modeldeploy-operator\s+harvest: ", events), events

    # Retries of the same bad input (at once, then after a back-off) keep it Failed: no flapping.
    harvest = runner.containers[HARVEST_CONTAINER]
    wait_for(lambda: harvest.restart_count >= 2 and not harvest.running, "two harvest retries", 60)
    phases = world.phases[name]
    print(f"phases of {name}: {phases}")
    assert phases[phases.index("Failed") :] == ["Failed"], phases
    assert not world.server_processes(name), "the server must not start after a failed harvest"


#: A container whose readiness passes and whose liveness fails (HTTP 500 on /health).
FAILING_LIVENESS_SERVER = """
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ready" else 500)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_fake_kubelet_restarts_a_container_that_fails_liveness(
    world: World, tmp_path: Path
) -> None:
    name = "liveness-demo"
    probe = {"periodSeconds": 1, "failureThreshold": 2}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {
                            "name": "web",
                            "image": "registry.test/web:1",
                            "command": ["python", "-c", FAILING_LIVENESS_SERVER],
                            "args": ["--port", "8000"],
                            "ports": [{"name": "web", "containerPort": 8000}],
                            "readinessProbe": {
                                **probe,
                                "httpGet": {"port": "web", "path": "/ready"},
                            },
                            "livenessProbe": {
                                **probe,
                                "httpGet": {"port": "web", "path": "/health"},
                            },
                        }
                    ],
                },
            },
        },
    }
    path = tmp_path / "liveness.yaml"
    path.write_text(yaml.safe_dump(deployment))
    world.kubectl("apply", "-f", str(path))

    def web_status() -> dict[str, Any] | None:
        pods = world.kubectl.json("get", "pods", "-l", f"app={name}")["items"]
        statuses = [s for p in pods for s in (p.get("status") or {}).get("containerStatuses", [])]
        return statuses[0] if statuses and statuses[0]["restartCount"] >= 2 else None

    status = wait_for(web_status, "two liveness restarts", 60)
    assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGTERM
    events = world.kubectl.json("get", "events", "--field-selector", "involvedObject.kind=Pod")
    messages = [(e["reason"], e["message"]) for e in events["items"]]
    assert ("Killing", "Container web failed liveness probe, will be restarted") in messages
    assert any(
        r == "Unhealthy" and "Liveness probe failed: HTTP probe failed with statuscode: 500" in m
        for r, m in messages
    ), messages
    runners = world.kubelet.pods_of(NAMESPACE, name)
    world.kubectl("delete", "deployment", name)
    wait_for(
        lambda: all(not c.running for r in runners for c in r.containers.values()),
        "the liveness demo's process to stop",
        30,
    )


def test_kubectl_delete_stops_processes_and_removes_everything(world: World) -> None:
    runners = world.servers() + world.servers("tiny-missing")
    assert runners
    out = world.kubectl("delete", "md", world.name, "tiny-missing", "--timeout=60s")
    assert f'"{world.name}" deleted' in out

    def all_stopped() -> bool:
        return all(
            c.proc is None or c.proc.poll() is not None
            for r in runners
            for c in r.containers.values()
        )

    wait_for(all_stopped, "every container process to exit", 60)
    assert "No resources found" in world.kubectl.run("get", "md").stderr
    for kind in ("deployment", "service"):
        gone = world.kubectl.run("get", kind, world.name, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr, (kind, gone)
    assert world.kubectl.json("get", "pods")["items"] == []
