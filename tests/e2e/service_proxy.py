"""kube-proxy for the fake node: each Service port becomes a local TCP port.

A connection to a Service's local port is spliced to one *ready* pod that the
Service's selector matches (round robin), at the pod's local port for the
Service's `targetPort` (a container port name or number) — so a client talks to
"the Service" and never to a pod that fails its readiness probe, as in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Mapping
from typing import Any

from e2e.informer import Informer
from e2e.kubelet import FakeKubelet
from e2e.launch import POD_IP

SERVICES_PATH = "/api/v1/services"
_CHUNK = 65536


class ServiceProxy:
    """Listens on one local port per (namespace, service, port); runs its own event loop."""

    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet
        self.ports: dict[tuple[str, str, int], int] = {}
        self._servers: dict[tuple[str, str, int], asyncio.AbstractServer] = {}
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        self._turn = itertools.count()
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-proxy")
        self._thread.daemon = True
        self.informer = Informer(kubelet.url, SERVICES_PATH, listener=self._on_event)

    def __enter__(self) -> ServiceProxy:
        self._thread.start()
        self.informer.start()
        for obj in self.informer.snapshot().values():
            self._on_event("ADDED", obj)
        return self

    def __exit__(self, *exc: object) -> None:
        self.informer.stop()
        asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def port(self, namespace: str, name: str, port: int) -> int:
        """The local port of Service `name`'s `port`."""
        return self.ports[(namespace, name, port)]

    async def _close_all(self) -> None:
        """Close the listeners and cut the open connections (kept-alive client sockets)."""
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for writer in list(self._open):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait(tasks, timeout=5) if tasks else None

    def _on_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if kind == "DELETED":
            self._services.pop(key, None)
            for port_key in [k for k in self._servers if k[:2] == key]:
                self._loop.call_soon_threadsafe(self._servers.pop(port_key).close)
                self.ports.pop(port_key, None)
            return
        self._services[key] = dict(obj)
        for port in (obj.get("spec") or {}).get("ports") or []:
            port_key = (*key, int(port["port"]))
            if port_key not in self._servers:
                future = asyncio.run_coroutine_threadsafe(self._listen(port_key), self._loop)
                future.result(10)

    async def _listen(self, port_key: tuple[str, str, int]) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._splice(port_key, reader, writer)

        server = await asyncio.start_server(handle, POD_IP, 0)
        self._servers[port_key] = server
        self.ports[port_key] = server.sockets[0].getsockname()[1]

    def _endpoint(self, port_key: tuple[str, str, int]) -> int | None:
        service = self._services.get(port_key[:2])
        if service is None:
            return None
        spec = service.get("spec") or {}
        target = next(
            (
                p.get("targetPort", p["port"])
                for p in spec.get("ports") or []
                if p["port"] == port_key[2]
            ),
            None,
        )
        if target is None:
            return None
        ports = self.kubelet.ready_ports(port_key[0], spec.get("selector") or {}, str(target))
        if not ports:
            return None
        return ports[next(self._turn) % len(ports)]

    async def _splice(
        self,
        port_key: tuple[str, str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        endpoint = self._endpoint(port_key)
        if endpoint is None:  # no ready endpoint: the connection is refused (reset)
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(POD_IP, endpoint)
        except OSError:
            writer.transport.abort()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(_CHUNK):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()

        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._open.difference_update((writer, up_writer))
