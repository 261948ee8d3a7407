"""Idempotent apply of the built children: create what is missing, restore what drifted.

"Applied" means: the object exists, carries our labels, annotations and
controller reference, and its spec contains what the builder produced. The
API server adds defaults of its own (imagePullPolicy, protocol, clusterIP...),
so the test is containment, not equality; when it fails the spec is replaced
with ours (a hand edit is undone, a changed ModelDeployment rolls out). The
replace carries the resourceVersion we read, so a concurrent writer makes it
fail with 409 and the handler retries instead of overwriting blindly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from modeldeploy.operator.kubeapi import RESOURCES_BY_KIND, ApiError, KubeApi, ResourceRef

#: Kinds whose spec is immutable after creation (a PVC's size, class, access modes).
CREATE_ONLY_KINDS = frozenset({"PersistentVolumeClaim"})
#: Kinds where fields the server allocated (a Service's clusterIP) must survive a replace.
OVERLAY_SPEC_KINDS = frozenset({"Service"})


def contains(actual: Any, wanted: Any) -> bool:
    """Whether `actual` has everything `wanted` has (dicts may hold more keys)."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and contains(actual[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    if isinstance(wanted, int) and isinstance(actual, str) and not isinstance(wanted, bool):
        return actual == str(wanted)  # the API server returns quantities as strings
    return actual == wanted


def _overlay(base: Any, top: Any) -> Any:
    """`top` merged onto `base`: dicts merge key by key, everything else is replaced."""
    if isinstance(base, Mapping) and isinstance(top, Mapping):
        merged = dict(base)
        for key, value in top.items():
            merged[key] = _overlay(base.get(key), value)
        return merged
    return copy.deepcopy(top)


def _owners(current: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    uids = {o["uid"] for o in wanted}
    kept = [o for o in current if o.get("uid") not in uids and not o.get("controller")]
    return kept + wanted


def desired_update(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The object to PUT so that `current` matches `desired`, or None when it already does."""
    meta, want = current.get("metadata") or {}, desired["metadata"]
    meta_ok = (
        contains(meta.get("labels") or {}, want.get("labels") or {})
        and contains(meta.get("annotations") or {}, want.get("annotations") or {})
        and contains(meta.get("ownerReferences") or [], want.get("ownerReferences") or [])
    )
    kind = desired["kind"]
    spec_ok = kind in CREATE_ONLY_KINDS or contains(current.get("spec"), desired.get("spec"))
    if meta_ok and spec_ok:
        return None
    updated = copy.deepcopy(dict(current))
    new_meta = updated.setdefault("metadata", {})
    new_meta["labels"] = {**(meta.get("labels") or {}), **(want.get("labels") or {})}
    if want.get("annotations") or meta.get("annotations"):
        new_meta["annotations"] = {
            **(meta.get("annotations") or {}),
            **(want.get("annotations") or {}),
        }
    if want.get("ownerReferences"):
        new_meta["ownerReferences"] = _owners(
            list(meta.get("ownerReferences") or []), want["ownerReferences"]
        )
    if kind in OVERLAY_SPEC_KINDS:
        updated["spec"] = _overlay(current.get("spec") or {}, desired["spec"])
    elif kind not in CREATE_ONLY_KINDS:
        updated["spec"] = copy.deepcopy(desired["spec"])
    return updated


def resource_of(obj: Mapping[str, Any]) -> ResourceRef:
    return RESOURCES_BY_KIND[(obj["apiVersion"], obj["kind"])]


def apply(api: KubeApi, desired: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Make `desired` true in the cluster; return the object and what was done.

    The action is "created", "updated" or "unchanged".
    """
    ref = resource_of(desired)
    meta = desired["metadata"]
    path = ref.path(meta["namespace"], meta["name"])
    current = api.get_or_none(path)
    if current is None:
        try:
            return api.create(ref.path(meta["namespace"]), desired), "created"
        except ApiError as exc:
            if exc.status != 409:  # someone created it in between: fall through and compare
                raise
            current = api.get(path)
    update = desired_update(current, desired)
    if update is None:
        return current, "unchanged"
    return api.replace(path, update), "updated"
