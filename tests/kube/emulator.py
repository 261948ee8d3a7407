"""A strict Kubernetes API emulator for kopf operators, built on kmock==0.8.

kmock's `KubernetesEmulator` stores objects and serves them, but is too lax
for an operator: no uid/resourceVersion/generation/creationTimestamp, the
namespace is not taken from the URL, a failed JSON-patch `test` is a 500, no
PUT, no selectors, every watch replays everything and ignores
`?resourceVersion`. This subclass serves the API the way kube-apiserver does
in the parts an operator relies on:

* metadata: uid, a cluster-wide resourceVersion, generation bumped only when
  something other than metadata/status changes, creationTimestamp,
  generateName, namespace from the URL; no-op writes change nothing;
* create 409 AlreadyExists, 404 NotFound, PUT with resourceVersion
  preconditions (409 Conflict), merge / JSON (422 on a failed `test`) /
  a simplified strategic-merge patch;
* `status` and `scale` subresources (writes to the main resource ignore
  status, writes to /status change only status);
* finalizers and deletionTimestamp, and garbage collection of dependents
  through ownerReferences (background propagation);
* list and watch with label and field selectors, watches that resume from
  `?resourceVersion` and end after `?timeoutSeconds`;
* admission: a CRD installed with `install_crd` gets its schema defaults,
  unknown-field refusal, OpenAPI and CEL validation (422 Invalid naming the
  fields), and `kubectl get`'s Table output with the printer columns.

It depends on kmock internals (the fallback reactions and the object store),
hence the exact pin in pyproject.toml. Like any kmock handler, explicit
reactions take precedence, which is how fault tests inject errors:
`emulator['patch', kmock.resource('apps', 'v1', 'deployments')] << 500`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import dsl, rendering

from kube.crd import CustomResourceSchema, Invalid
from kube.selectors import object_matcher

Key = tuple[kmock.resource, str | None, str]

#: Watch events kept for resuming watches; older resourceVersions get 410 Gone.
EVENT_LOG_LIMIT = 20000


def _by_priority(payloads: list[Any]) -> list[Any]:
    """kmock's ordering: higher priority first (tuples padded with zeros), then insertion."""
    width = max((len(p.priorities) for p in payloads), default=0)

    def key(payload: Any) -> tuple[float, ...]:
        priority = tuple(-p for p in payload.priorities)
        return priority + (0,) * (width - len(priority))

    return sorted(payloads, key=key)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_error(
    status: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> kmock.KubernetesError:
    return kmock.KubernetesError(
        status=status, reason=reason, message=message, details=dict(details or {})
    )


def _header(request: kmock.Request, name: str) -> str:
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_MERGE_KEYS = ("name", "type", "containerPort", "mountPath", "devicePath", "ip")


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A simplified strategic merge: lists of objects merge by their usual key (name, type...).

    `$patch` directives and `$setElementOrder` are not supported (they are not
    used by the clients these tests drive).
    """
    if isinstance(patch, Mapping):
        result = dict(target) if isinstance(target, Mapping) else {}
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = strategic_merge_patch(result.get(key), value)
        return result
    mergeable = (
        isinstance(patch, list)
        and isinstance(target, list)
        and patch
        and all(isinstance(i, Mapping) for i in patch + target)
    )
    if mergeable:
        for merge_key in _MERGE_KEYS:
            if all(merge_key in i for i in patch + target):
                merged = [dict(i) for i in target]
                index = {i[merge_key]: n for n, i in enumerate(merged)}
                for item in patch:
                    if item[merge_key] in index:
                        n = index[item[merge_key]]
                        merged[n] = strategic_merge_patch(merged[n], item)
                    else:
                        merged.append(copy.deepcopy(dict(item)))
                return merged
    return copy.deepcopy(patch)


@attrs.define(kw_only=True)
class StrictKubernetesEmulator(kmock.KubernetesEmulator):
    """The strict emulator (see the module docstring). Use with `kmock.Server`."""

    #: Refuse unknown fields unless a request says `?fieldValidation=Ignore|Warn`.
    strict_fields: bool = True
    #: Delete dependents of a deleted object (background propagation).
    garbage_collection: bool = True

    _schemas: dict[kmock.resource, CustomResourceSchema] = attrs.field(factory=dict, init=False)
    _scale_paths: dict[kmock.resource, tuple[str, str, str]] = attrs.field(factory=dict, init=False)
    _rv: itertools.count = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _last_rv: int = attrs.field(default=999, init=False)
    _log: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _subscribers: set[asyncio.Queue] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/.+")] << self._serve_openapi_group_version
        self._scale_paths[kmock.resource("apps", "v1", "deployments")] = (
            "spec.replicas",
            "status.replicas",
            "",
        )

    # ---- setup -------------------------------------------------------------------------

    def install_crd(self, crd: Mapping[str, Any]) -> CustomResourceSchema:
        """Serve a CRD's resource with its admission rules; store the CRD object too."""
        schema = CustomResourceSchema(crd)
        res = kmock.resource(schema.group, schema.version, schema.plural)
        self.resources[res] = kmock.ResourceInfo(
            kind=schema.kind,
            singular=schema.names.get("singular"),
            namespaced=schema.namespaced,
            shortnames=set(schema.names.get("shortNames") or []),
            categories=set(schema.names.get("categories") or []),
            verbs={
                "get",
                "list",
                "watch",
                "create",
                "update",
                "patch",
                "delete",
                "deletecollection",
            },
            subresources=set(schema.subresources),
        )
        self._schemas[res] = schema
        scale = schema.subresources.get("scale")
        if scale:
            self._scale_paths[res] = (
                scale["specReplicasPath"].lstrip("."),
                scale["statusReplicasPath"].lstrip("."),
                (scale.get("labelSelectorPath") or "").lstrip("."),
            )
        crds = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        stored = self._stamp(copy.deepcopy(dict(crd)))
        self._objects[crds, None, crd["metadata"]["name"]] = stored
        return schema

    def schema_for(self, res: kmock.resource) -> CustomResourceSchema | None:
        return self._schemas.get(res)

    async def _serve_version(self, request: kmock.Request) -> Any:
        """API discovery like kube-apiserver's: subresources carry no short names.

        kmock copies a resource's short names and kind to its subresources, which makes
        kubectl warn that `md` "could also match" modeldeployments/status.
        """
        listing = await super()._serve_version(request)
        listing["groupVersion"] = listing["groupVersion"].lstrip("/")  # core is "v1"
        for entry in listing.get("resources", []):
            if "/" in entry["name"]:
                sub = entry["name"].split("/", 1)[1]
                entry["shortNames"], entry["categories"], entry["singularName"] = [], [], ""
                entry["verbs"] = ["get", "patch", "update"]
                if sub == "scale":
                    entry.update(group="autoscaling", version="v1", kind="Scale")
        return listing

    # ---- plumbing ----------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> Any:
        """RawHandler._handle with a constant-time "does this reaction see the request".

        We skip KubernetesEmulator._handle: it writes objects before the reactions run,
        so an injected error response would still change the state; our fallbacks write.
        kmock's own membership test (`request in view`) re-filters every request recorded
        so far, which makes a long test quadratic; plain filter chains are decided on the
        request alone here, anything else (slices, groups) keeps kmock's exact semantics.
        """
        for payload in _by_priority(self._payloads):
            if payload._disabled.is_set() or not self._sees(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:
                payload._disabled.set()
            except NotImplementedError:
                pass
        raise NotImplementedError("no reaction matches the request")

    def _sees(self, view: dsl.View, request: kmock.Request) -> bool:
        if view is self:
            return True
        if type(view) is dsl.Filter:
            return self._sees(view._source, request) and bool(view.criteria(request))
        if type(view) is dsl.Priority:
            return self._sees(view._source, request)
        return request in view

    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _has_sub(self, res: kmock.resource, sub: str) -> bool:
        return res in self.resources and sub in self.resources[res].subresources

    def _kind(self, res: kmock.resource) -> str:
        if res in self.resources and self.resources[res].kind:
            return str(self.resources[res].kind)
        return res.plural.capitalize()

    def _qualified(self, res: kmock.resource) -> str:
        return f"{res.plural}.{res.group}" if res.group else str(res.plural)

    def _get(self, key: Key) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def _require(self, key: Key) -> dict[str, Any]:
        obj = self._get(key)
        if obj is None:
            raise _status_error(
                404,
                "NotFound",
                f'{self._qualified(key[0])} "{key[2]}" not found',
                {"name": key[2], "kind": key[0].plural},
            )
        return obj

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["creationTimestamp"] = now_rfc3339()
        meta.setdefault("generation", 1)
        return obj

    def _emit(self, res: kmock.resource, kind: str, obj: Mapping[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": kind, "object": copy.deepcopy(dict(obj))}
        self._log.append((rv, res, event))
        del self._log[:-EVENT_LOG_LIMIT]
        for queue in list(self._subscribers):
            queue.put_nowait((res, event))

    def _store(self, key: Key, obj: dict[str, Any], kind: str) -> None:
        if key in self._objects:
            self._objects[key].history.append(copy.deepcopy(obj))
        else:
            self._objects[key] = copy.deepcopy(obj)
        self._emit(key[0], kind, obj)

    def _admit(
        self,
        res: kmock.resource,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        request: kmock.Request,
    ) -> dict[str, Any]:
        schema = self._schemas.get(res)
        if schema is None:
            return obj
        mode = request.params.get("fieldValidation") or ("Strict" if self.strict_fields else "")
        try:
            return schema.admit(obj, old, strict=mode == "Strict")
        except Invalid as exc:
            raise _status_error(
                422,
                "Invalid",
                str(exc),
                {
                    "name": exc.name,
                    "group": res.group,
                    "kind": schema.kind,
                    "causes": [
                        {"reason": c.reason, "message": c.message, "field": c.field}
                        for c in exc.causes
                    ],
                },
            ) from None

    # ---- writes ------------------------------------------------------------------------

    def _finish_write(
        self,
        key: Key,
        old: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
        request: kmock.Request,
    ) -> dict[str, Any]:
        """Apply the subresource split, immutables, generation, admission; store if changed."""
        res = key[0]
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        elif self._has_sub(res, "status") and subresource is None:
            new["status"] = copy.deepcopy(old.get("status"))
            if new["status"] is None:
                new.pop("status")
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for field in ("uid", "creationTimestamp", "namespace", "name", "generation"):
            if field in old_meta:
                meta[field] = old_meta[field]
        if old_meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
        else:
            meta.pop("deletionTimestamp", None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        new = self._admit(res, new, old, request)
        meta = new["metadata"]
        if new == old:
            return old  # a no-op write changes nothing and wakes no watcher
        body_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }
        if body_changed:
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._store(key, new, "MODIFIED")
            self._remove(key)
            return new
        self._store(key, new, "MODIFIED")
        return new

    def _remove(self, key: Key) -> None:
        obj = self._get(key)
        if obj is None:
            return
        self._objects[key].delete()
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(key[0], "DELETED", obj)
        if self.garbage_collection:
            self._collect_dependents(obj["metadata"]["uid"])

    def _collect_dependents(self, owner_uid: str) -> None:
        for key, item in list(self._objects.items()):
            if item.deleted:
                continue
            owners = item.raw.get("metadata", {}).get("ownerReferences") or []
            if any(o.get("uid") == owner_uid for o in owners):
                self._delete(key)

    def _collect_if_orphaned(self, key: Key, obj: Mapping[str, Any]) -> None:
        """The garbage collector removes an object all of whose owners are gone.

        (A controller that read its owner just before the owner's deletion may still create
        a child; on a cluster the GC deletes it shortly after, here at once.)
        """
        owners = {o.get("uid") for o in obj["metadata"].get("ownerReferences") or []}
        if not self.garbage_collection or not owners:
            return
        live = {
            item.raw["metadata"].get("uid") for item in self._objects.values() if not item.deleted
        }
        if not owners & live:
            self._remove(key)

    def _delete(self, key: Key) -> dict[str, Any]:
        obj = self._require(key)
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_rfc3339()
                meta["deletionGracePeriodSeconds"] = 0
                meta["resourceVersion"] = self._next_rv()
                self._store(key, obj, "MODIFIED")
            return obj
        self._remove(key)
        return obj

    # ---- fallbacks (the API) -------------------------------------------------------------

    def _key(self, request: kmock.Request, name: str | None = None) -> Key:
        assert request.resource is not None
        return (request.resource, request.namespace, name or request.name or "")

    def _known(self, request: kmock.Request) -> None:
        if request.resource not in self.resources and not any(
            k[0] == request.resource for k in self._objects
        ):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")

    async def _serve_create(self, request: kmock.Request) -> Any:
        self._known(request)
        body = request.data
        if not isinstance(body, Mapping):
            raise _status_error(400, "BadRequest", "the request body is not a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if request.namespace and meta.get("namespace") not in (None, request.namespace):
            raise _status_error(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        if request.namespace:
            meta["namespace"] = request.namespace
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _status_error(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                )
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        assert request.resource is not None
        res = request.resource
        obj.setdefault("apiVersion", f"{res.group}/{res.version}" if res.group else res.version)
        obj.setdefault("kind", self._kind(res))
        for field in ("uid", "resourceVersion", "generation", "creationTimestamp"):
            meta.pop(field, None)
        meta.pop("deletionTimestamp", None)
        if self._has_sub(res, "status"):
            obj.pop("status", None)
        key = self._key(request, meta["name"])
        async with self._lock:
            if self._get(key) is not None:
                raise _status_error(
                    409,
                    "AlreadyExists",
                    f'{self._qualified(res)} "{meta["name"]}" already exists',
                    {"name": meta["name"], "kind": res.plural},
                )
            obj = self._admit(res, obj, None, request)
            obj = self._stamp(obj)
            self._store(key, obj, "ADDED")
            self._collect_if_orphaned(key, obj)
        return kmock.Response(status=201, payload=obj)

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        async with self._lock:
            obj = self._require(self._key(request))
        if request.subresource == "scale":
            return self._scale_view(request.resource, obj)
        if _wants_table(request):
            return self._table(request.resource, [obj])
        return obj

    async def _serve_list(self, request: kmock.Request) -> Any:
        self._known(request)
        matches = self._matcher(request)
        async with self._lock:
            items = [
                copy.deepcopy(item.raw)
                for (res, ns, _name), item in self._objects.items()
                if res == request.resource
                and not item.deleted
                and (request.namespace is None or ns == request.namespace)
                and matches(item.raw)
            ]
            rv = str(self._last_rv)
        if _wants_table(request):
            return self._table(request.resource, items)
        assert request.resource is not None
        kind = self._kind(request.resource)
        return {
            "apiVersion": (
                f"{request.resource.group}/{request.resource.version}"
                if request.resource.group
                else request.resource.version
            ),
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    def _matcher(self, request: kmock.Request) -> Any:
        try:
            return object_matcher(
                request.params.get("labelSelector"), request.params.get("fieldSelector")
            )
        except ValueError as exc:
            raise _status_error(400, "BadRequest", str(exc)) from None

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """A watch stream of JSON lines (kubectl refuses kmock's default octet-stream)."""
        matches = self._matcher(request)  # a bad selector is a 400, before the stream starts
        return kmock.Response(
            status=200,
            headers={"Content-Type": "application/json"},
            payload=self._watch_events(request, matches),
        )

    async def _watch_events(self, request: kmock.Request, matches: Any) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion") or ""
        since = since if since.isdigit() else ""
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        queue: asyncio.Queue = asyncio.Queue()
        backlog: list[dict[str, Any]] = []

        def wanted(res: kmock.resource, event: Mapping[str, Any]) -> bool:
            obj = event["object"]
            ns = (obj.get("metadata") or {}).get("namespace")
            return (
                res == request.resource
                and (request.namespace is None or ns == request.namespace)
                and (request.name is None or obj["metadata"].get("name") == request.name)
                and matches(obj)
            )

        initial_events = request.params.get("sendInitialEvents") == "true"
        async with self._lock:
            if since in ("", "0") or initial_events:
                for (res, _ns, _name), item in self._objects.items():
                    if not item.deleted and wanted(res, {"object": item.raw}):
                        backlog.append({"type": "ADDED", "object": copy.deepcopy(item.raw)})
                if initial_events:  # the watch-list protocol of client-go >= 1.32
                    backlog.append(self._initial_events_end(request))
            else:
                oldest = self._log[0][0] if self._log else self._last_rv + 1
                if int(since) < oldest - 1 and len(self._log) >= EVENT_LOG_LIMIT:
                    backlog.append(_gone(since))
                else:
                    backlog.extend(
                        copy.deepcopy(e)
                        for rv, r, e in self._log
                        if rv > int(since) and wanted(r, e)
                    )
            self._subscribers.add(queue)
        yield b""  # send the headers now, as a real API server does
        try:
            async with asyncio.timeout(timeout):
                for event in backlog:
                    yield event
                while True:
                    res, event = await queue.get()
                    if wanted(res, event):
                        yield event
        except TimeoutError:
            return
        finally:
            self._subscribers.discard(queue)

    def _initial_events_end(self, request: kmock.Request) -> dict[str, Any]:
        assert request.resource is not None
        res = request.resource
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
                "kind": self._kind(res),
                "metadata": {
                    "resourceVersion": str(self._last_rv),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            },
        }

    async def _serve_update(self, request: kmock.Request) -> Any:
        content_type = _header(request, "Content-Type").split(";")[0].strip()
        patch = request.data
        async with self._lock:
            key = self._key(request)
            old = self._require(key)
            if request.subresource == "scale":
                current = self._scale_view(request.resource, old)
                wanted = self._apply_patch(current, patch, content_type)
                return self._set_scale(key, old, wanted, request)
            if isinstance(patch, Mapping):
                want_rv = (patch.get("metadata") or {}).get("resourceVersion")
                if want_rv and want_rv != old["metadata"]["resourceVersion"]:
                    raise _conflict(key, self)
            new = self._apply_patch(old, patch, content_type)
            return self._finish_write(key, old, new, request.subresource, request)

    async def _serve_replace(self, request: kmock.Request) -> Any:
        body = request.data
        if not isinstance(body, Mapping) or request.name is None:
            raise _status_error(405, "MethodNotAllowed", "PUT needs an object URL and body")
        async with self._lock:
            key = self._key(request)
            old = self._require(key)
            if request.subresource == "scale":
                return self._set_scale(key, old, dict(body), request)
            want_rv = (body.get("metadata") or {}).get("resourceVersion")
            if want_rv and want_rv != old["metadata"]["resourceVersion"]:
                raise _conflict(key, self)
            if body.get("metadata", {}).get("name") not in (None, request.name):
                raise _status_error(400, "BadRequest", "the name of the object does not match")
            return self._finish_write(
                key, old, copy.deepcopy(dict(body)), request.subresource, request
            )

    async def _serve_delete(self, request: kmock.Request) -> Any:
        async with self._lock:
            key = self._key(request)
            policy = ""
            if isinstance(request.data, Mapping):
                policy = request.data.get("propagationPolicy") or ""
            policy = request.params.get("propagationPolicy") or policy
            if policy == "Orphan":
                previous, self.garbage_collection = self.garbage_collection, False
                try:
                    return self._delete(key)
                finally:
                    self.garbage_collection = previous
            return self._delete(key)

    def _apply_patch(self, current: dict[str, Any], patch: Any, content_type: str) -> dict:
        if content_type == "application/json-patch+json" or isinstance(patch, list):
            try:
                return jsonpatch.apply_patch(current, patch, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise _status_error(422, "Invalid", f"the test operation failed: {exc}") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _status_error(422, "Invalid", f"the JSON patch failed: {exc}") from None
        if not isinstance(patch, Mapping):
            raise _status_error(400, "BadRequest", "the patch is not a JSON object")
        if content_type == "application/strategic-merge-patch+json":
            return strategic_merge_patch(current, patch)
        if content_type == "application/apply-patch+yaml":
            raise _status_error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        return merge_patch(current, patch)

    # ---- scale -------------------------------------------------------------------------

    def _scale_view(self, res: kmock.resource | None, obj: Mapping[str, Any]) -> dict[str, Any]:
        assert res is not None
        if res not in self._scale_paths:
            raise _status_error(404, "NotFound", f"{self._qualified(res)} has no scale subresource")
        spec_path, status_path, selector_path = self._scale_paths[res]
        meta = obj["metadata"]
        status: dict[str, Any] = {"replicas": _dig(obj, status_path) or 0}
        selector = _dig(obj, selector_path) if selector_path else None
        if selector:
            status["selector"] = selector
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": _dig(obj, spec_path) or 0},
            "status": status,
        }

    def _set_scale(
        self, key: Key, old: dict[str, Any], scale: Mapping[str, Any], request: kmock.Request
    ) -> dict[str, Any]:
        want_rv = (scale.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise _conflict(key, self)
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _status_error(
                422,
                "Invalid",
                f'Scale.autoscaling "{key[2]}" is invalid: spec.replicas: '
                f"Invalid value: {json.dumps(replicas)}: must be greater than or equal to 0",
            )
        spec_path = self._scale_paths[key[0]][0]
        new = copy.deepcopy(old)
        _put(new, spec_path, replicas)
        stored = self._finish_write(key, old, new, None, request)
        return self._scale_view(key[0], stored)

    # ---- OpenAPI v3 (kubectl apply's field validation, kubectl explain) -------------------

    def _group_versions(self) -> dict[str, list[kmock.resource]]:
        found: dict[str, list[kmock.resource]] = {}
        for res in self.resources:
            if res.version and res.plural:
                path = f"apis/{res.group}/{res.version}" if res.group else f"api/{res.version}"
                found.setdefault(path, []).append(res)
        return found

    async def _serve_openapi_root(self, request: kmock.Request) -> Any:
        return {
            "paths": {
                path: {"serverRelativeURL": f"/openapi/v3/{path}?hash={len(self._schemas)}"}
                for path in self._group_versions()
            }
        }

    async def _serve_openapi_group_version(self, request: kmock.Request) -> Any:
        """Enough of a group-version's OpenAPI v3 document for kubectl.

        Every resource's PATCH and PUT accept `fieldValidation` (so `kubectl apply` lets the
        server validate, and the CRD admission above does), and installed CRDs publish
        their schema with descriptions (so `kubectl explain md.spec` works).
        """
        path = request.url.path.removeprefix("/openapi/v3/")
        resources = self._group_versions().get(path)
        if resources is None:
            raise _status_error(404, "NotFound", f"no OpenAPI document for {path}")
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for res in resources:
            gvk = {"group": res.group, "version": res.version, "kind": self._kind(res)}
            operation = {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "OK"}},
            }
            namespaced = res in self.resources and self.resources[res].namespaced
            scope = "namespaces/{namespace}/" if namespaced else ""
            item = f"/{path}/{scope}{res.plural}/{{name}}"
            paths[item] = {"patch": operation, "put": operation}
            paths[f"/{path}/{scope}{res.plural}"] = {"post": operation}
            schema = self._schemas.get(res)
            if schema is not None:
                name = ".".join([*reversed(res.group.split(".")), res.version, schema.kind])
                schemas[name] = {
                    **copy.deepcopy(dict(schema.schema)),
                    "x-kubernetes-group-version-kind": [gvk],
                }
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.35.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    # ---- kubectl's Table output ----------------------------------------------------------

    def _table(self, res: kmock.resource | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        assert res is not None
        schema = self._schemas.get(res)
        columns = [
            {"name": "Name", "type": "string", "format": "name", "description": "Name"},
        ]
        extra = list(schema.printer_columns) if schema else []
        if not schema:
            extra = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        for col in extra:
            columns.append(
                {
                    "name": col["name"],
                    "type": col.get("type", "string"),
                    "format": col.get("format", ""),
                    "description": col.get("description", ""),
                    "priority": col.get("priority", 0),
                }
            )
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for col in extra:
                value = _dig(obj, col["jsonPath"].lstrip("."))
                if col.get("type") == "date" and value:
                    value = _age(value)
                cells.append(value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj["metadata"],
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._last_rv)},
            "columnDefinitions": columns,
            "rows": rows,
        }


def _wants_table(request: kmock.Request) -> bool:
    return "as=Table" in _header(request, "Accept")


def _age(timestamp: str) -> str:
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _dig(obj: Any, path: str) -> Any:
    node = obj
    for part in [p for p in path.split(".") if p]:
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _put(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = [p for p in path.split(".") if p]
    node = obj
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _conflict(key: Key, emulator: StrictKubernetesEmulator) -> kmock.KubernetesError:
    return _status_error(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {emulator._qualified(key[0])} "{key[2]}": the object '
        "has been modified; please apply your changes to the latest version and try again",
        {"name": key[2], "kind": key[0].plural},
    )


def _gone(since: str) -> dict[str, Any]:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "code": 410,
            "reason": "Expired",
            "message": f"too old resource version: {since}",
        },
    }
