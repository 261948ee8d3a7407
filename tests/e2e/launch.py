"""How a container of a pod spec becomes a local process launch: argv, env, paths, ports.

The fake kubelet runs what the Deployment says, so this module only *translates*
the container spec to this machine, the way a container runtime would:

* the image is this checkout's virtual environment: its environment variables
  (ENV of `Dockerfile.server`, with the image's venv replaced by ours) come first,
  then the container's `env` (`value`, `secretKeyRef`/`configMapKeyRef` read from
  the emulator, `fieldRef` for the pod's name/namespace/IP), with Kubernetes'
  `$(VAR)` expansion in env, command and args;
* every volume mount is a host directory; absolute mount paths in args and env
  values (also inside `file://` URIs and `--flag=/path`) are rewritten to it;
* each container port is a free local port; `--port N` / `--port=N` and the probe
  ports follow it, and `--host 0.0.0.0` binds 127.0.0.1 (the "pod IP");
* `terminationMessagePath` lives in the pod directory and its path is handed to the
  server through `MODELDEPLOY_TERMINATION_LOG` (the server's override of
  /dev/termination-log).
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser
from modeldeploy.server.contract import ENV_PREFIX, TERMINATION_LOG
from modeldeploy.server.http.settings import TERMINATION_LOG_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The image whose environment the pods get (its venv is this checkout's venv).
SERVER_DOCKERFILE = REPO_ROOT / "Dockerfile.server"
#: PATH of the base image (python:*-slim), appended to the image's own PATH entries.
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The "pod IP": every pod of the fake node listens on loopback.
POD_IP = "127.0.0.1"
#: `modeldeploy serve --port` as an environment variable.
PORT_ENV = f"{ENV_PREFIX}PORT"

#: Reads one object from the emulator: (kind 'secrets'|'configmaps', namespace, name) -> obj.
ObjectReader = Callable[[str, str, str], Mapping[str, Any] | None]


class ContainerConfigError(Exception):
    """The container cannot be created as specified (kubelet: CreateContainerConfigError)."""


def image_env() -> dict[str, str]:
    """ENV of Dockerfile.server's final stage, with its venv mapped to the running venv."""
    with SERVER_DOCKERFILE.open("rb") as handle:
        parser = DockerfileParser(fileobj=handle, env_replace=True)
        envs = dict(parser.envs)
        venv = "/opt/venv"
        for item in parser.structure:
            if item["instruction"] == "ARG" and item["value"].startswith("VENV="):
                venv = item["value"].split("=", 1)[1].strip("\"'")
    path_parts = [p for p in envs.get("PATH", "").split(":") if p]
    path_parts = [sys.prefix + p[len(venv) :] if p.startswith(venv) else p for p in path_parts]
    envs["PATH"] = ":".join([*path_parts, BASE_IMAGE_PATH])
    return envs


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind((POD_IP, 0))
        return int(sock.getsockname()[1])


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables are replaced, `$$` escapes, rest kept."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(sub, text)


@dataclass
class PathMap:
    """Container mount paths -> host directories, and the rewriting of values that name them."""

    mounts: dict[str, Path] = field(default_factory=dict)

    def rewrite(self, value: str) -> str:
        """Rewrite a mount path at the start of `value`, after `file://` or after `--flag=`."""
        if not self.mounts:
            return value
        alternatives = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
        pattern = re.compile(rf"(^|=|file://)({alternatives})(?=/|$)")
        return pattern.sub(lambda m: m.group(1) + str(self.mounts[m.group(2)]), value)

    def host_path(self, container_path: str) -> Path:
        """The host path of an absolute container path (must lie under a mount)."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if container_path == mount or container_path.startswith(mount.rstrip("/") + "/"):
                return self.mounts[mount] / container_path[len(mount) :].lstrip("/")
        raise ContainerConfigError(f"{container_path} is not on any volume of the pod")


@dataclass
class Launch:
    """Everything needed to start one container instance as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ports: dict[str, int]  # container port (as str number and as name) -> local port
    termination_log: Path
    termination_policy: str


def _key_ref(
    ref: Mapping[str, Any], kind: str, namespace: str, read: ObjectReader, var: str
) -> str | None:
    name, key = ref.get("name", ""), ref.get("key", "")
    obj = read(kind, namespace, name)
    singular = "secret" if kind == "secrets" else "configmap"
    if obj is None:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f'{singular} "{name}" not found')
    if kind == "secrets":
        data = obj.get("data") or {}
        if key in data:
            return base64.b64decode(data[key]).decode()
        string_data = obj.get("stringData") or {}
        if key in string_data:
            return str(string_data[key])
    else:
        data = obj.get("data") or {}
        if key in data:
            return str(data[key])
    if ref.get("optional"):
        return None
    raise ContainerConfigError(
        f"couldn't find key {key} in {singular} {namespace}/{name} (env {var})"
    )


def _field_ref(ref: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    path = ref.get("fieldPath", "")
    meta = pod.get("metadata") or {}
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "status.podIP": POD_IP,
        "status.hostIP": POD_IP,
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
    }
    if path not in values:
        raise ContainerConfigError(f"fieldRef {path} is not supported by the fake kubelet")
    return str(values[path])


def container_env(
    container: Mapping[str, Any], pod: Mapping[str, Any], read: ObjectReader
) -> dict[str, str]:
    """The container's environment as the runtime builds it (image env, then `env`, in order)."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env = image_env()
    env["HOSTNAME"] = (pod.get("metadata") or {}).get("name", "")
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], "secrets", namespace, read, name)
        elif "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], "configmaps", namespace, read, name)
        elif "fieldRef" in source:
            value = _field_ref(source["fieldRef"], pod)
        elif not source:
            value = ""
        else:
            raise ContainerConfigError(f"env {name}: {sorted(source)} not supported")
        if value is not None:
            env[name] = value
    return env


def _rewrite_ports(args: list[str], ports: Mapping[int, int]) -> list[str]:
    """`--port N` / `--port=N` for a declared container port -> its local port; bind loopback."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--port" and i + 1 < len(out) and out[i + 1].isdigit():
            out[i + 1] = str(ports.get(int(out[i + 1]), int(out[i + 1])))
        elif arg.startswith("--port=") and arg[7:].isdigit():
            out[i] = f"--port={ports.get(int(arg[7:]), int(arg[7:]))}"
        elif arg == "--host" and i + 1 < len(out) and out[i + 1] == "0.0.0.0":
            out[i + 1] = POD_IP
    return out


def build_launch(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    volumes: Mapping[str, Path],
    port_map: Mapping[int, int],
    container_dir: Path,
    read: ObjectReader,
) -> Launch:
    """Translate one container of `pod` into a Launch.

    `volumes` maps the pod's volume names to host directories, `port_map` container
    ports to local ports, `container_dir` is this container's private directory
    (termination log, working directory).
    """
    name = container["name"]
    paths = PathMap()
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise ContainerConfigError(f"volume {mount['name']!r} is not defined in the pod")
        host = volumes[mount["name"]]
        sub = mount.get("subPath")
        paths.mounts[mount["mountPath"]] = host / sub if sub else host
    env = container_env(container, pod, read)
    # PATH already names host directories (image_env mapped the image's venv to this
    # one); rewriting it again would break when the checkout lives under a mount path
    # such as /tmp (CI clones there).
    env = {k: v if k == "PATH" else paths.rewrite(v) for k, v in env.items()}
    command = [expand(c, env) for c in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if not command:
        raise ContainerConfigError(f"container {name}: the fake kubelet needs an explicit command")
    argv = [paths.rewrite(a) for a in _rewrite_ports(command + args, port_map)]
    exe = shutil.which(argv[0], path=env["PATH"])
    if exe is None:
        raise ContainerConfigError(f'exec: "{argv[0]}": executable file not found in $PATH')
    argv[0] = exe
    ports: dict[str, int] = {}
    for port in container.get("ports") or []:
        local = port_map[int(port["containerPort"])]
        ports[str(port["containerPort"])] = local
        if port.get("name"):
            ports[port["name"]] = local
    if env.get(PORT_ENV, "").isdigit():  # `serve` also takes its port from the environment
        env[PORT_ENV] = str(port_map.get(int(env[PORT_ENV]), int(env[PORT_ENV])))
    container_dir.mkdir(parents=True, exist_ok=True)
    message_path = container.get("terminationMessagePath") or TERMINATION_LOG
    termination_log = container_dir / Path(message_path).name
    env[TERMINATION_LOG_ENV] = str(termination_log)
    working_dir = container.get("workingDir")
    return Launch(
        name=name,
        argv=argv,
        env=env,
        cwd=paths.host_path(working_dir) if working_dir else container_dir,
        ports=ports,
        termination_log=termination_log,
        termination_policy=container.get("terminationMessagePolicy") or "File",
    )
