"""A strict emulated API server in a background thread, and a plain sync client for it.

Tests (and the e2e harness's fake kubelet) stay synchronous: the emulator runs
in its own event loop thread, the operator in another (see `kube.operator`),
and the test talks HTTP to it like kubectl or the kubelet would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import kmock
import yaml

from kube.crd import MODELDEPLOYMENT_CRD
from kube.emulator import StrictKubernetesEmulator

T = TypeVar("T")

#: The ModelDeployment resource as kmock names it.
MD = kmock.resource("modeldeploy.dev", "v1alpha1", "modeldeployments")
PODMONITORS = kmock.resource("monitoring.coreos.com", "v1", "podmonitors")


def resource_path(
    res: kmock.resource, namespace: str | None = None, name: str | None = None, sub: str = ""
) -> str:
    path = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
    if namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{res.plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class ApiStatusError(Exception):
    """A non-2xx answer; `status` and the API server's `body` (a Status object) are kept."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body.get('message', body)}")
        self.status = status
        self.body = body


class Cluster:
    """The emulator served on 127.0.0.1 from a background thread.

    Use as a context manager. `crds` are installed with their admission rules;
    `podmonitor_crd` additionally serves monitoring.coreos.com/v1 podmonitors
    (as if the Prometheus Operator were installed).
    """

    def __init__(
        self, crds: tuple[Path, ...] = (MODELDEPLOYMENT_CRD,), *, podmonitor_crd: bool = False
    ) -> None:
        self.crds = crds
        self.podmonitor_crd = podmonitor_crd
        self.emulator: StrictKubernetesEmulator | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.http: httpx.Client | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"the emulator did not start: {self._error!r}")
        self.http = httpx.Client(base_url=self.url, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.http is not None:
            self.http.close()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = StrictKubernetesEmulator()
        emulator.resources.load_bundled()
        for path in self.crds:
            emulator.install_crd(yaml.safe_load(path.read_text()))
        if self.podmonitor_crd:
            emulator.resources[PODMONITORS] = kmock.ResourceInfo(
                kind="PodMonitor",
                namespaced=True,
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
        self.emulator = emulator
        async with emulator, kmock.Server(emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the emulator's loop (for direct, race-free access to its store)."""
        assert self._loop is not None

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(10)

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig pointing at the emulator (for kubectl in the e2e tests)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # ---- a plain client -----------------------------------------------------------------

    def request(
        self, method: str, path: str, *, body: Any = None, content_type: str = "", **params: Any
    ) -> dict[str, Any]:
        assert self.http is not None
        headers = {"Content-Type": content_type or "application/json"}
        response = self.http.request(
            method, path, json=body, params=params or None, headers=headers
        )
        data = response.json() if response.content else {}
        if response.status_code >= 300:
            raise ApiStatusError(response.status_code, data)
        return data

    def create(self, res: kmock.resource, obj: Mapping[str, Any], **params: Any) -> dict:
        namespace = (obj.get("metadata") or {}).get("namespace")
        return self.request("POST", resource_path(res, namespace), body=dict(obj), **params)

    def get(self, res: kmock.resource, namespace: str | None, name: str, sub: str = "") -> dict:
        return self.request("GET", resource_path(res, namespace, name, sub))

    def get_or_none(self, res: kmock.resource, namespace: str | None, name: str) -> dict | None:
        try:
            return self.get(res, namespace, name)
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, res: kmock.resource, namespace: str | None = None, **params: Any
    ) -> list[dict[str, Any]]:
        return self.request("GET", resource_path(res, namespace), **params)["items"]

    def patch(
        self,
        res: kmock.resource,
        namespace: str | None,
        name: str,
        patch: Any,
        sub: str = "",
        content_type: str = "application/merge-patch+json",
    ) -> dict[str, Any]:
        return self.request(
            "PATCH",
            resource_path(res, namespace, name, sub),
            body=patch,
            content_type=content_type,
        )

    def delete(self, res: kmock.resource, namespace: str | None, name: str) -> dict[str, Any]:
        return self.request("DELETE", resource_path(res, namespace, name))

    def events(self, namespace: str, involved_name: str) -> list[dict[str, Any]]:
        return self.list(
            kmock.resource("", "v1", "events"),
            namespace,
            fieldSelector=f"involvedObject.name={involved_name}",
        )


def wait_for(
    probe: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiStatusError):
            last = probe()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}: last={last!r}")


@contextlib.contextmanager
def running_cluster(**kwargs: Any) -> Iterator[Cluster]:
    with Cluster(**kwargs) as cluster:
        yield cluster
