"""Run the real modeldeploy operator in-process, in its own thread and event loop.

`kopf.operator()` waits 5 s at shutdown for tasks it did not start, and
`kopf.run_tasks` waits as long for per-object tasks that outlive the root tasks
(a timer re-spawned by an event that arrived during the shutdown). Spawning the
tasks with `kopf.spawn_tasks`, running them with `kopf.run_tasks` (ignoring our
own tasks) and cancelling the stragglers once the root tasks are done stops the
operator in well under a second, so a test can stop and restart it mid-way.
The operator connects to the emulator through the same login path it uses in
a cluster: a preset client configuration instead of the kubeconfig.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from types import TracebackType

import kopf
from kubernetes import client as k8s_client
from modeldeploy.operator import handlers

TEST_IMAGE = "registry.test/modeldeploy-server:test"


class OperatorRunner:
    """The operator against `url`, watching `namespaces` (or all when None)."""

    def __init__(
        self,
        url: str,
        namespaces: Sequence[str] | None = ("default",),
        *,
        interval: float = 2.0,
        default_image: str = TEST_IMAGE,
    ) -> None:
        self.url = url
        self.namespaces = list(namespaces) if namespaces is not None else None
        configuration = k8s_client.Configuration(host=url)
        self.context = handlers.OperatorContext(
            default_image=default_image, interval=interval, configuration=configuration
        )
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> OperatorRunner:
        self._thread = threading.Thread(target=self._run, name="modeldeploy-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError(f"the operator did not become ready: {self.error!r}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the operator did not stop in time")
        if self.error is not None:
            raise RuntimeError(f"the operator failed: {self.error!r}") from self.error

    def __enter__(self) -> OperatorRunner:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        settings = handlers.build_settings()
        settings.batching.batch_window = 0.02  # react to events quickly in tests
        settings.watching.reconnect_backoff = 0.2
        tasks = await kopf.spawn_tasks(
            registry=handlers.build_registry(self.context),
            settings=settings,
            clusterwide=self.namespaces is None,
            namespaces=self.namespaces or (),
            standalone=True,
            stop_flag=self._stop,
            ready_flag=self._ready,
        )
        main = asyncio.current_task()

        async def orchestrate() -> None:
            await kopf.run_tasks(tasks, ignored={main, asyncio.current_task()})

        runner = asyncio.create_task(orchestrate())
        await asyncio.wait(tasks)  # the root tasks end once the stop flag is set
        # kopf then gives stray per-object tasks (a timer re-spawned by an event that arrived
        # during the shutdown) 5 s to finish on their own; they never do, so cancel them now.
        for task in asyncio.all_tasks():
            if task not in (main, runner) and not task.done():
                task.cancel()
        await runner
