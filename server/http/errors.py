"""Every error the HTTP layer returns, in the OpenAI shape, mapped in one place.

OpenAI clients (the official SDKs, LangChain, curl scripts) read
`{"error": {"message", "type", "param", "code"}}` and the status code; FastAPI's
defaults (422 with a `detail` list, HTML-free but differently shaped) would break
them. So validation errors become 400s naming the field, our typed
`UserInputError`s become 4xx, engine capacity/health errors become 429/503, and
only a bug of ours is a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from modeldeploy.server.errors import ModeldeployError, UserInputError
from modeldeploy.server.logs import request_id_var
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("modeldeploy.http")

#: status -> OpenAI error `type` (the SDKs map status codes to exception classes;
#: `type` is what humans and log pipelines group by).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


class ApiError(Exception):
    """An error response decided by the HTTP layer (status, message, machine code)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object for a status and message."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSONResponse carrying the OpenAI error object."""
    return JSONResponse(
        error_body(status, message, code, param), status_code=status, headers=headers
    )


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})


def _is_type_tag(part: str) -> bool:
    # our field names are identifiers; pydantic's tags look like 'constrained-str', 'list[int]'
    return part in _TYPE_TAGS or any(c in part for c in "[(-")


def _field_path(loc: Sequence[int | str]) -> str:
    """`('body', 'messages', 0, 'content')` -> `messages[0].content` (what a user wrote)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # pydantic tags union members ('str', 'list[int]', 'function-after[...]'); users never
    # wrote those, so they are dropped from the path.
    parts = [p for p in parts if isinstance(p, int) or not _is_type_tag(p)]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _most_telling(errors: Sequence[Any]) -> Any:
    """The error to report: the first field's, preferring the union branch the input took.

    A `str | list[int]` field given `[true]` fails both branches; "should be a valid
    string" is true but useless, "[0]: should be a valid integer" is the answer. So among
    the first field's errors: deepest location first, then constraint errors (too short,
    too large) over plain type mismatches.
    """
    first_field = _field_path(errors[0].get("loc", ())).split("[")[0].split(".")[0]

    def rank(error: Any) -> tuple[int, int]:
        path = _field_path(error.get("loc", ()))
        type_mismatch = str(error.get("type", "")).endswith("_type")
        return (-path.count("[") - path.count("."), int(type_mismatch))

    same_field = [
        e
        for e in errors
        if _field_path(e.get("loc", ())).split("[")[0].split(".")[0] == first_field
    ]
    return min(same_field, key=rank)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the bad field and why, plus the field path as `param`."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    chosen = _most_telling(errors)
    kind = chosen.get("type", "")
    path = _field_path(chosen.get("loc", ()))
    msg = str(chosen.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "json_invalid":
        ctx = chosen.get("ctx") or {}
        return f"request body is not valid JSON: {ctx.get('error', msg)}", None
    if kind == "missing" and not path:
        return "request body is required (a JSON object)", None
    if not path:
        return f"request body: {msg}", None
    fields = {_field_path(e.get("loc", ())).split("[")[0].split(".")[0] for e in errors}
    more = f" (and {len(fields) - 1} more fields)" if len(fields) > 1 else ""
    return f"{path}: {msg}{more}", path


def _engine_error_statuses() -> list[tuple[type[BaseException], int, str]]:
    """Engine errors that are not the user's fault but still not a 500 of ours."""
    from modeldeploy.server.engine import errors as engine_errors

    return [
        (engine_errors.EngineOverloadedError, 429, "engine_overloaded"),
        (engine_errors.InsufficientMemoryError, 503, "insufficient_memory"),
        (engine_errors.ModelPoisonedError, 503, "model_poisoned"),
        (engine_errors.EngineClosedError, 503, "engine_closed"),
    ]


def api_error_for(exc: BaseException) -> ApiError:
    """Map any exception raised while serving a request to the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    try:
        mapping = _engine_error_statuses()
    except ImportError:  # the engine package is optional for probes-only tests
        mapping = []
    for cls, status, code in mapping:
        if isinstance(exc, cls):
            headers = {"Retry-After": "1"} if status == 429 else None
            return ApiError(status, str(exc), code=code, headers=headers)
    if isinstance(exc, UserInputError):
        return ApiError(400, str(exc), code=type(exc).__name__)
    rid = request_id_var.get()
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal server error (request id {rid})", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI/Starlette or our code raises through the OpenAI shape."""

    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        err = api_error_for(exc)
        return error_response(
            err.status, err.message, code=err.code, param=err.param, headers=err.headers
        )

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        return error_response(400, message, code="invalid_value", param=param)

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"{_request.url.path}: no such endpoint"
        elif exc.status_code == 405:
            message = f"{_request.method} is not allowed on {_request.url.path}"
        elif exc.status_code == 400 and message == _FASTAPI_PARSE_ERROR:
            # FastAPI's words when json.loads itself fails (deep nesting, huge numbers)
            message = "request body is not valid JSON (too deeply nested, or a number too long)"
        return error_response(exc.status_code, message, headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # ApiError and ModeldeployError are answered by the inner exception middleware;
    # `Exception` (a bug of ours) reaches Starlette's outermost handler, which answers
    # 500 in our shape and re-raises so the server logs the traceback.
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ModeldeployError, on_api_error)
    app.add_exception_handler(Exception, on_api_error)
