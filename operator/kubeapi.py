"""How the operator talks to the Kubernetes API: one connection, plain dicts.

The official client loads the credentials (in-cluster service account or
kubeconfig, with token refresh) and carries the requests; we keep the objects
as plain dicts because the builders produce dicts and the status code reads
dicts, and because the typed models would silently drop fields they do not
know (a PodMonitor, our own CR). kopf gets its connection from the same
configuration (see `connection_info`), so both always point at one cluster.

The calls are synchronous: kopf runs sync handlers in worker threads, and a
sync call made from inside an async handler would block the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kopf
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

#: Seconds one API call may take (connect, read); kopf retries the handler after a timeout.
REQUEST_TIMEOUT = (5.0, 30.0)


class ApiError(Exception):
    """A non-2xx answer of the API server (status is the HTTP code, 0 for a transport error)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ResourceRef:
    """Group, version and plural of a resource, which is all a URL needs."""

    group: str
    version: str
    plural: str

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        parts = [base]
        if namespace:
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


DEPLOYMENTS = ResourceRef("apps", "v1", "deployments")
SERVICES = ResourceRef("", "v1", "services")
PVCS = ResourceRef("", "v1", "persistentvolumeclaims")
PODS = ResourceRef("", "v1", "pods")

#: apiVersion/kind of every child kind we create -> its resource.
RESOURCES_BY_KIND: dict[tuple[str, str], ResourceRef] = {
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("v1", "Service"): SERVICES,
    ("v1", "PersistentVolumeClaim"): PVCS,
    ("monitoring.coreos.com/v1", "PodMonitor"): ResourceRef(
        "monitoring.coreos.com", "v1", "podmonitors"
    ),
}


def load_configuration() -> k8s_client.Configuration:
    """Credentials as a pod (service account) or, outside a cluster, from the kubeconfig."""
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)
    return configuration


def connection_info(configuration: k8s_client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials in the form kopf's own API client takes."""
    header = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class KubeApi:
    """A thin dict-in, dict-out wrapper over the official client's transport."""

    def __init__(self, configuration: k8s_client.Configuration) -> None:
        self.configuration = configuration
        self._client = k8s_client.ApiClient(configuration)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self._client.param_serialize(
            method,
            path,
            query_params=list(query.items()) if query else None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(
                method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT
            )
            data = response.read()
        except k8s_client.ApiException as exc:
            raise ApiError(exc.status or 0, exc.reason or "Error", str(exc.body or exc)) from None
        except Exception as exc:  # connection refused, timeouts: the caller retries
            raise ApiError(0, type(exc).__name__, str(exc)) from None
        if not 200 <= response.status < 300:
            raise _error(response.status, response.reason, data)
        return json.loads(data) if data else {}

    def get(self, path: str, **query: str) -> dict[str, Any]:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=dict(body))

    def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, body=dict(body))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.request(
            "PATCH", path, body=dict(patch), content_type="application/merge-patch+json"
        )

    def delete(self, path: str) -> dict[str, Any]:
        return self.request("DELETE", path)

    def has_group_version(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in group/version (i.e. its CRD exists)."""
        try:
            listing = self.get(f"/apis/{group}/{version}")
        except ApiError as exc:
            if exc.status in (403, 404, 503):
                return False
            raise
        return any(r.get("name") == plural for r in listing.get("resources") or [])


def _error(status: int, reason: str | None, data: bytes | None) -> ApiError:
    message = ""
    try:
        payload = json.loads(data or b"{}")
        message = payload.get("message") or ""
        reason = payload.get("reason") or reason
    except ValueError:
        message = (data or b"").decode(errors="replace")[:500]
    return ApiError(status, reason or "Error", message)
