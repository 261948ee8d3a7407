"""A list-then-watch cache of one resource, like client-go's informer, for the fake kubelet.

The kubelet and the test's phase recorder react to watch events instead of
polling, so short-lived states (a harvest that runs for half a second) are seen
in the order the API server committed them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx

Key = tuple[str, str]
Listener = Callable[[str, dict[str, Any]], None]

#: Seconds a watch request stays open before it is renewed from the last resourceVersion
#: (short, because stopping an informer waits for the open request to end).
WATCH_TIMEOUT_S = 1


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


class Informer:
    """Keeps `objects` equal to the API server's view of `path` (a collection URL).

    `listener(event_type, obj)` is called from the informer's thread for every
    event, after the cache is updated ("ADDED", "MODIFIED", "DELETED").
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        *,
        listener: Listener | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url
        self.path = path
        self.params = dict(params or {})
        self.listeners: list[Listener] = [listener] if listener else []
        self.objects: dict[Key, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer{self.path}", daemon=True)
        self._thread.start()
        if not self.synced.wait(10):
            raise RuntimeError(f"informer for {self.path} did not sync: {self.error!r}")
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop watching; with `wait=False` only ask (several informers then stop together)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join(WATCH_TIMEOUT_S + 5)

    def snapshot(self) -> dict[Key, dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(self.objects)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _notify(self, kind: str, obj: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(kind, copy.deepcopy(obj))

    def _relist(self, client: httpx.Client) -> str:
        response = client.get(self.path, params=self.params)
        response.raise_for_status()
        body = response.json()
        fresh = {key_of(o): o for o in body.get("items") or []}
        with self.lock:
            gone = [self.objects[k] for k in self.objects if k not in fresh]
            changed = [
                ("ADDED" if k not in self.objects else "MODIFIED", o)
                for k, o in fresh.items()
                if self.objects.get(k) != o
            ]
            self.objects = fresh
        for obj in gone:
            self._notify("DELETED", obj)
        for kind, obj in changed:
            self._notify(kind, obj)
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=WATCH_TIMEOUT_S + 10) as client:
            rv = ""
            while not self._stop.is_set():
                try:
                    if not rv:
                        rv = self._relist(client)
                        self.synced.set()
                    rv = self._watch(client, rv)
                except Exception as exc:  # a closed stream, the emulator going away: start over
                    if self._stop.is_set():
                        break
                    self.error = exc
                    rv = ""
                    self._stop.wait(0.2)

    def _watch(self, client: httpx.Client, rv: str) -> str:
        """One watch request; returns the resourceVersion to resume from ("" = relist)."""
        params = {
            **self.params,
            "watch": "true",
            "resourceVersion": rv,
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
            "allowWatchBookmarks": "true",
        }
        with client.stream("GET", self.path, params=params) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if self._stop.is_set():
                    return rv
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    return ""  # 410 Gone and friends: start over with a fresh list
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if kind == "BOOKMARK":
                    continue
                key = key_of(obj)
                with self.lock:
                    if kind == "DELETED":
                        self.objects.pop(key, None)
                    else:
                        self.objects[key] = obj
                self._notify(str(kind), obj)
        return rv


@contextlib.contextmanager
def informing(base_url: str, path: str, **kwargs: Any):  # type: ignore[no-untyped-def]
    """An Informer for the duration of a `with` block."""
    informer = Informer(base_url, path, **kwargs).start()
    try:
        yield informer
    finally:
        informer.stop()
