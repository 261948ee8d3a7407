"""Pure-ASGI middleware: request ids and logs, request metrics, body cap, API key.

Written against raw ASGI instead of Starlette's BaseHTTPMiddleware on purpose:
that wrapper buffers and re-plumbs `receive`, which breaks disconnect detection
and streaming (the two things a model server must get right), and it cannot see
the end of a streamed body to time it.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Iterable

from modeldeploy.server import metrics
from modeldeploy.server.contract import HEALTH_PATH, METRICS_PATH, READY_PATH
from modeldeploy.server.http.errors import error_response
from modeldeploy.server.http.runtime import ServerRuntime
from modeldeploy.server.logs import model_var, request_id_var
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("modeldeploy.http")

#: Open without an API key and logged at DEBUG (the kubelet calls them every few seconds).
PROBE_PATHS = frozenset({HEALTH_PATH, READY_PATH, METRICS_PATH})
#: Open without an API key: the schema is not a secret and fuzzers/SDK generators read it.
PUBLIC_PATHS = PROBE_PATHS | {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
#: Routes that run the model: counted as in flight (SIGTERM waits for them).
INFERENCE_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/predict", "/predict/batch"}
)
REQUEST_ID_HEADER = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
#: Status logged and counted when the client went away before the answer (nginx's 499).
CLIENT_CLOSED = 499
_JSON_TYPES = frozenset({"application/json"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id (honours X-Request-Id), one JSON log line and metrics per request."""

    def __init__(self, app: ASGIApp, runtime: ServerRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        rid_token = request_id_var.set(rid)
        model_token = model_var.set(self.runtime.model_name)
        path = scope.get("path", "")
        inference = path in INFERENCE_PATHS and scope.get("method") == "POST"
        status = CLIENT_CLOSED
        start = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if inference:
            self.runtime.inflight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            if inference:
                self.runtime.inflight -= 1
            elapsed = time.monotonic() - start
            self._record(scope, path, status, elapsed)
            request_id_var.reset(rid_token)
            model_var.reset(model_token)

    def _record(self, scope: Scope, path: str, status: int, elapsed: float) -> None:
        route = scope.get("route")
        # a 401/413 from the middleware below is answered before routing: name the path
        template = getattr(route, "path", None) or (path if path in INFERENCE_PATHS else None)
        level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
        log.log(
            level,
            "request",
            extra={
                "method": scope.get("method"),
                "path": path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
        if template is None or template in PUBLIC_PATHS:
            return  # unmatched paths would let clients mint label values
        model = self.runtime.model_name
        metrics.REQUESTS.labels(model, template, str(status)).inc()
        metrics.REQUEST_DURATION.labels(model, template).observe(elapsed)


class BodyLimitMiddleware:
    """413 for bodies over `--max-body-bytes`: by Content-Length up front, else while reading.

    Also reads a JSON-looking body sent as a form (`curl -d` without `-H`) as JSON.

    The body is read here (at most the cap) and replayed to the app, so an app that
    has started parsing never sees a truncated body; after the replay `receive` is
    the server's again, so disconnects still reach the handlers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client left while sending; nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, None)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(_as_json(scope, body), _replay(body, receive), send)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, declared: int | None
    ) -> None:
        what = f"{declared} bytes" if declared is not None else "more bytes"
        response = error_response(
            413,
            f"request body of {what} exceeds the limit of {self.max_bytes} bytes"
            " (--max-body-bytes)",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _as_json(scope: Scope, body: bytes) -> Scope:
    """`curl -d '{...}'` labels JSON as a form; like llama.cpp, read a JSON-looking body as JSON."""
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if content_type in _JSON_TYPES or body.lstrip()[:1] not in (b"{", b"["):
        return scope
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but the probes, metrics and the schema."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("path") in PUBLIC_PATHS
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
        ):
            await self.app(scope, receive, send)
            return
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        presented = token.strip().encode()
        # compare_digest against every key: the time taken does not reveal which matched
        ok = scheme.lower() == "bearer" and any(
            hmac.compare_digest(presented, k) for k in self.keys
        )
        if not ok:
            message = "missing API key" if not auth else "invalid API key"
            response = error_response(
                401,
                f"{message}: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
