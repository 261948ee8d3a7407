"""schemathesis against a live server's own /openapi.json, with a fixed budget per operation.

Every operation gets `max_examples` schema-valid cases (positive) and as many schema-breaking
ones (negative). Each response must not be a 5xx, must use a documented status code and
content type, and must match its documented schema and headers. All failures are collected
(not just the first), each as one line a human can replay with curl.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def run_schemathesis(
    url: str, headers: dict[str, str], max_examples: int, timeout: float = 60
) -> dict[str, Any]:
    """Fuzz every operation; return {"operations", "cases", "statuses", "failures"}."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tally: dict[str, Any] = {"operations": 0, "cases": 0, "statuses": {}, "failures": []}
    for result in schema.get_all_operations():
        operation = result.ok()
        tally["operations"] += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(operation, mode, url, headers, max_examples, timeout, tally)
            except Unsatisfiable:  # nothing to break (no parameters, no body): no negative case
                assert mode is GenerationMode.NEGATIVE, operation.label
    tally["statuses"] = dict(sorted(tally["statuses"].items()))
    return tally


def _fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    url: str,
    headers: dict[str, str],
    max_examples: int,
    timeout: float,
    tally: dict[str, Any],
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        tally["cases"] += 1
        response = case.call(base_url=url, headers=headers, timeout=timeout)
        statuses = tally["statuses"]
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:  # FailureGroup is a BaseExceptionGroup
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            tally["failures"].append(
                f"{operation.label} [{mode.value}] -> {response.status_code}: {first} "
                f"| {case.as_curl_command(headers=headers)}"
            )

    fuzz()
