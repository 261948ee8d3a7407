"""API discovery as kube-apiserver answers it, so the real kubectl can map kinds to resources.

kmock's discovery documents differ from kube-apiserver's in two ways that matter
to kubectl: the core group's resource list says `groupVersion: "/v1"` instead of
`"v1"` (kubectl then cannot map any core kind: "no matches for kind
PersistentVolumeClaim in version v1"), and subresources (`x/status`, `x/scale`)
repeat their resource's short names and categories (every `kubectl get md` then
warns that "md" could also match modeldeployments/status). The reactions added
here take kmock's own answers and correct those fields; explicit reactions take
precedence over the emulator's fallbacks, so the emulator itself is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import kmock
from kube.cluster import Cluster

_GROUP_VERSION = re.compile(r"/api/v1|/apis/[^/]+/[^/]+")


def fix_resource_list(document: dict[str, Any]) -> dict[str, Any]:
    """Correct an APIResourceList: core groupVersion, subresources without names/categories."""
    if document.get("groupVersion", "").startswith("/"):
        document["groupVersion"] = document["groupVersion"].lstrip("/")
    for resource in document.get("resources") or []:
        if "/" in resource["name"]:
            resource["shortNames"] = []
            resource["categories"] = []
            resource["singularName"] = ""
    return document


def serve_kubectl_discovery(cluster: Cluster) -> None:
    """Install the corrected discovery reactions on the running emulator of `cluster`."""
    emulator = cluster.emulator
    assert emulator is not None

    async def resource_list(request: kmock.Request) -> dict[str, Any]:
        return fix_resource_list(await emulator._serve_version(request))

    def install() -> None:
        emulator["get", _GROUP_VERSION] << resource_list

    cluster.call(install)
