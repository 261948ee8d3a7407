"""Label and annotation keys the operator puts on what it creates, defined once.

Selectors, the Service, the PodMonitor, the status `selector` (which the scale
subresource hands to autoscalers) and the watches that map a child back to its
ModelDeployment all derive from these functions, so they cannot drift apart.
"""

from __future__ import annotations

#: Our API group doubles as the prefix of every annotation and finalizer we own.
DOMAIN = "modeldeploy.dev"

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"
PART_OF = "app.kubernetes.io/part-of"

APP_NAME = "modeldeploy"
MANAGER = "modeldeploy-operator"
SERVER_COMPONENT = "server"

#: Hash of the pod template we built; changes whenever a spec change must roll the pods.
TEMPLATE_HASH = f"{DOMAIN}/template-hash"
#: kopf's finalizer; deletion itself relies on ownerReferences.
FINALIZER = f"{DOMAIN}/finalizer"


def selector_labels(name: str) -> dict[str, str]:
    """Labels that select the pods of ModelDeployment `name` (immutable once created)."""
    return {NAME: APP_NAME, INSTANCE: name}


def child_labels(name: str, component: str = SERVER_COMPONENT) -> dict[str, str]:
    """All recommended labels of a child object of ModelDeployment `name`."""
    return {
        **selector_labels(name),
        COMPONENT: component,
        PART_OF: APP_NAME,
        MANAGED_BY: MANAGER,
    }


def selector_string(name: str) -> str:
    """`selector_labels` as a label-selector string (status.selector, list calls)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


#: Label filter for the watches of children: only objects this operator manages.
MANAGED_FILTER: dict[str, str] = {MANAGED_BY: MANAGER}
