"""`modeldeploy operator`: run the kopf operator for ModelDeployments.

It watches the namespaces named with --namespace (repeatable) or all of them,
serves a liveness endpoint for its own Deployment's probe (kopf's, at
/healthz) and the operator metrics of `operator.metrics` in Prometheus format.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import kopf
from modeldeploy.operator import handlers, metrics
from modeldeploy.operator.spec import SERVER_IMAGE_ENV, default_server_image
from modeldeploy.server import logs
from modeldeploy.server.errors import UserInputError
from prometheus_client import start_http_server

HEALTH_PORT_ENV = "MODELDEPLOY_OPERATOR_HEALTH_PORT"
METRICS_PORT_ENV = "MODELDEPLOY_OPERATOR_METRICS_PORT"
DEFAULT_HEALTH_PORT = 8081
DEFAULT_METRICS_PORT = 9090
HEALTH_PATH = "/healthz"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"${name}: {value!r} is not a port number") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    parser.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--server-image",
        default=None,
        help=f"image for pods whose spec has none (default ${SERVER_IMAGE_ENV} or "
        f"{default_server_image()})",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        help=f"liveness endpoint port, path {HEALTH_PATH} (default ${HEALTH_PORT_ENV} or "
        f"{DEFAULT_HEALTH_PORT}; 0 disables it)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"Prometheus metrics port (default ${METRICS_PORT_ENV} or {DEFAULT_METRICS_PORT}; "
        "0 disables it)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=handlers.DEFAULT_INTERVAL,
        help="seconds between level-based re-reconciles (default %(default)s)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    if args.all_namespaces and args.namespace:
        raise UserInputError("give either --namespace NS (repeatable) or --all-namespaces")
    if not args.all_namespaces and not args.namespace:
        raise UserInputError("give --namespace NS (repeatable) or --all-namespaces")
    if args.reconcile_interval <= 0:
        raise UserInputError("--reconcile-interval must be positive")
    health_port = (
        args.health_port
        if args.health_port is not None
        else _env_int(HEALTH_PORT_ENV, DEFAULT_HEALTH_PORT)
    )
    metrics_port = (
        args.metrics_port
        if args.metrics_port is not None
        else _env_int(METRICS_PORT_ENV, DEFAULT_METRICS_PORT)
    )
    logs.configure("DEBUG" if args.verbose else "INFO")  # JSON lines, like the server
    if metrics_port:
        start_http_server(metrics_port, registry=metrics.REGISTRY)
    ctx = handlers.OperatorContext(
        default_image=args.server_image, interval=args.reconcile_interval
    )
    asyncio.run(
        kopf.operator(
            registry=handlers.build_registry(ctx),
            settings=handlers.build_settings(),
            clusterwide=bool(args.all_namespaces),
            namespaces=list(args.namespace),
            liveness_endpoint=f"http://0.0.0.0:{health_port}{HEALTH_PATH}" if health_port else None,
            standalone=True,
        )
    )
    return 0
