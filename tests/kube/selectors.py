"""Label and field selectors as the API server reads them from `?labelSelector=`.

Kept apart from the emulator so the fake kubelet of the e2e tests can select
pods the way a Deployment controller would.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]

_SET_EXPR = re.compile(r"^\s*(!?)([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_EXPR = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")
_EXISTS_EXPR = re.compile(r"^\s*(!?)([\w./-]+)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p for p in parts if p.strip()]


def label_matcher(selector: str | None) -> Callable[[Mapping[str, str]], bool]:
    """A predicate over a labels dict; raises ValueError for a malformed selector."""
    if not selector:
        return lambda _labels: True
    tests: list[Callable[[Mapping[str, str]], bool]] = []
    for part in _split(selector):
        if m := _SET_EXPR.match(part):
            _, key, op, values = m.groups()
            allowed = {v.strip() for v in values.split(",") if v.strip()}
            if op == "in":
                tests.append(lambda lb, k=key, a=allowed: lb.get(k) in a)
            else:
                tests.append(lambda lb, k=key, a=allowed: lb.get(k) not in a)
        elif m := _EQ_EXPR.match(part):
            key, op, value = m.groups()
            if op == "!=":
                tests.append(lambda lb, k=key, v=value: lb.get(k) != v)
            else:
                tests.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif m := _EXISTS_EXPR.match(part):
            neg, key = m.groups()
            if neg:
                tests.append(lambda lb, k=key: k not in lb)
            else:
                tests.append(lambda lb, k=key: k in lb)
        else:
            raise ValueError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(t(labels) for t in tests)


def _lookup(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return ""
        node = node.get(part)
    if node is None:
        return ""
    if isinstance(node, bool):
        return str(node).lower()
    return str(node)


def field_matcher(selector: str | None) -> Matcher:
    """A predicate over a whole object for `metadata.name=x,involvedObject.uid!=y`."""
    if not selector:
        return lambda _obj: True
    tests: list[Matcher] = []
    for part in _split(selector):
        m = _EQ_EXPR.match(part)
        if not m:
            raise ValueError(f"invalid field selector: {part!r}")
        path, op, value = m.groups()
        if op == "!=":
            tests.append(lambda o, p=path, v=value: _lookup(o, p) != v)
        else:
            tests.append(lambda o, p=path, v=value: _lookup(o, p) == v)
    return lambda obj: all(t(obj) for t in tests)


def object_matcher(label_selector: str | None, field_selector: str | None) -> Matcher:
    labels = label_matcher(label_selector)
    fields = field_matcher(field_selector)
    return lambda obj: labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj)
