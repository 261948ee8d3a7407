"""What the API server does with a custom resource before storing it, without a cluster.

A CRD's structural schema is applied the way kube-apiserver applies it:
defaults first, then unknown fields (refused, as `kubectl apply`'s default
strict field validation does), then the OpenAPI constraints (translated to
JSON Schema and checked with `jsonschema`), list-type uniqueness, and finally
the `x-kubernetes-validations` CEL rules (evaluated with cel-python; the
Kubernetes CEL library extensions such as `quantity()` are not available, so
the CRD must not use them). Messages follow the API server's shape:
`spec.replicas: Invalid value: -1: ...`, so a test can assert that the field is
named.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELDEPLOYMENT_CRD = REPO_ROOT / "crds" / "modeldeployments.modeldeploy.dev.yaml"

_COPIED_KEYWORDS = (
    "type",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "required",
)


@dataclass(frozen=True)
class Cause:
    """One reason an object is invalid, naming the field like the API server does."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class Invalid(Exception):
    """The object is refused (HTTP 422 Invalid); `causes` name each field."""

    def __init__(self, kind: str, name: str, causes: list[Cause]) -> None:
        self.kind, self.name, self.causes = kind, name, causes
        listed = ", ".join(str(c) for c in causes)
        text = f"[{listed}]" if len(causes) > 1 else listed
        super().__init__(f'{kind} "{name}" is invalid: {text}')


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """Translate one OpenAPI v3 (Kubernetes structural) schema node to JSON Schema."""
    out: dict[str, Any] = {k: copy.deepcopy(node[k]) for k in _COPIED_KEYWORDS if k in node}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "anyOf" in node:
        out["anyOf"] = [to_json_schema(n) for n in node["anyOf"]]
    for key in ("allOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(n) for n in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(flag) is True and bound in out:
            out[flag] = out.pop(bound)
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if isinstance(node.get("additionalProperties"), Mapping):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    return out


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Fill `default`s the way the API server does (recursively, also inside new defaults)."""
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = apply_defaults(prop, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in list(value):
                value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _walk(
    schema: Mapping[str, Any], value: Any, path: tuple[Any, ...]
) -> Iterator[tuple[Mapping[str, Any], Any, tuple[Any, ...]]]:
    """Every (schema node, value, path) pair of an object, parents before children."""
    yield schema, value, path
    if isinstance(value, Mapping):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                yield from _walk(props[key], item, (*path, key))
            elif isinstance(extra, Mapping):
                yield from _walk(extra, item, (*path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            yield from _walk(schema["items"], item, (*path, index))


def _unknown_fields(schema: Mapping[str, Any], value: Any, path: tuple[Any, ...]) -> list[Cause]:
    causes = []
    for node, item, where in _walk(schema, value, path):
        if not isinstance(item, Mapping) or node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        if where == ("metadata",) or node.get("additionalProperties") not in (None, False):
            continue
        known = node.get("properties") or {}
        for key in item:
            if key not in known:
                field = _path((*where, key))
                causes.append(Cause(field, f'unknown field "{field}"', "FieldValueInvalid"))
    return causes


def prune(schema: Mapping[str, Any], value: Any, path: tuple[Any, ...] = ()) -> Any:
    """Drop unknown fields, as the API server does when field validation is not Strict."""
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key in list(value):
            if key in props:
                value[key] = prune(props[key], value[key], (*path, key))
            elif isinstance(extra, Mapping):
                value[key] = prune(extra, value[key], (*path, key))
            elif extra in (None, False) and path != ("metadata",):
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(schema["items"], item, path) for item in value]
    return value


def _describe(error: jsonschema.ValidationError, field: str) -> Cause:
    value = json.dumps(error.instance)
    kind = error.validator
    if kind == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        return Cause(
            field, f"Unsupported value: {value}: supported values: {allowed}", "Unsupported"
        )
    if kind == "type":
        return Cause(
            field,
            f"Invalid value: {value}: {field} in body must be of type {error.validator_value}",
        )
    bounds = {
        "minimum": "should be greater than or equal to",
        "maximum": "should be less than or equal to",
        "exclusiveMinimum": "should be greater than",
        "exclusiveMaximum": "should be less than",
    }
    if kind in bounds:
        return Cause(
            field, f"Invalid value: {value}: {field} in body {bounds[kind]} {error.validator_value}"
        )
    if kind == "pattern":
        return Cause(
            field, f"Invalid value: {value}: {field} in body should match '{error.validator_value}'"
        )
    if kind in ("maxLength", "maxItems", "maxProperties"):
        return Cause(field, f"Too long: may not be more than {error.validator_value}", "TooLong")
    if kind in ("minLength", "minItems", "minProperties"):
        return Cause(
            field,
            f"Invalid value: {value}: {field} in body should have at least "
            f"{error.validator_value} items or characters",
        )
    return Cause(field, f"Invalid value: {value}: {error.message}")


def _schema_errors(json_schema: Mapping[str, Any], obj: Any) -> list[Cause]:
    causes = []
    validator = jsonschema.Draft7Validator(json_schema)
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        if error.validator == "required":
            missing = [p for p in error.validator_value if p not in (error.instance or {})]
            for prop in missing:
                field = _path((*error.absolute_path, prop))
                causes.append(Cause(field, "Required value", "FieldValueRequired"))
            continue
        if error.validator == "anyOf" and error.context:
            error = error.context[0]
        causes.append(_describe(error, _path(error.absolute_path) or "<root>"))
    return causes


def _list_uniqueness(schema: Mapping[str, Any], obj: Any) -> list[Cause]:
    causes = []
    for node, value, where in _walk(schema, obj, ()):
        list_type = node.get("x-kubernetes-list-type")
        if not isinstance(value, list) or list_type not in ("set", "map"):
            continue
        seen: set[str] = set()
        for index, item in enumerate(value):
            if list_type == "map" and isinstance(item, Mapping):
                keys = {k: item.get(k) for k in node.get("x-kubernetes-list-map-keys") or []}
            else:
                keys = item
            fingerprint = json.dumps(keys, sort_keys=True)
            if fingerprint in seen:
                causes.append(
                    Cause(_path((*where, index)), f"Duplicate value: {fingerprint}", "Duplicate")
                )
            seen.add(fingerprint)
    return causes


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_rules(schema: Mapping[str, Any], obj: Any, old: Any, skip: set[str]) -> list[Cause]:
    causes = []
    for node, value, where in _walk(schema, obj, ()):
        rules = node.get("x-kubernetes-validations") or []
        if not rules:
            continue
        field = _path(where) or "<root>"
        if any(s == field or s.startswith(field + ".") or s.startswith(field + "[") for s in skip):
            continue  # the API server does not run CEL on values that fail the schema
        old_value = _follow(old, where)
        for rule in rules:
            text = rule["rule"]
            if "oldSelf" in text and old_value is None:
                continue  # transition rules only apply to updates
            activation = {"self": celpy.json_to_cel(value)}
            if old_value is not None:
                activation["oldSelf"] = celpy.json_to_cel(old_value)
            result = _program(text).evaluate(activation)
            if isinstance(result, celtypes.BoolType) and bool(result):
                continue
            message = rule.get("message") or f"failed rule: {text}"
            if rule.get("messageExpression"):
                message = str(_program(rule["messageExpression"]).evaluate(activation))
            target = (
                _path((*where, *rule["fieldPath"].lstrip(".").split(".")))
                if rule.get("fieldPath")
                else field
            )
            kind = _TYPE_NAMES.get(type(value), type(value).__name__)
            causes.append(Cause(target, f'Invalid value: "{kind}": {message}'))
    return causes


_TYPE_NAMES = {dict: "object", list: "array", int: "integer", str: "string", bool: "boolean"}


def _follow(obj: Any, where: tuple[Any, ...]) -> Any:
    node = obj
    for part in where:
        if isinstance(part, int):
            return None  # list items have no stable identity across versions
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class CustomResourceSchema:
    """One served version of a CRD, with the API server's admission behaviour."""

    def __init__(self, crd: Mapping[str, Any], version: str | None = None) -> None:
        self.crd = crd
        spec = crd["spec"]
        self.group: str = spec["group"]
        self.names: Mapping[str, Any] = spec["names"]
        self.kind: str = self.names["kind"]
        self.plural: str = self.names["plural"]
        self.namespaced = spec.get("scope", "Namespaced") == "Namespaced"
        served = [v for v in spec["versions"] if v.get("served")]
        chosen = next((v for v in served if v["name"] == version), None) if version else None
        self.version_spec = chosen or next(v for v in served if v.get("storage"))
        self.version: str = self.version_spec["name"]
        self.schema: Mapping[str, Any] = self.version_spec["schema"]["openAPIV3Schema"]
        self.json_schema = to_json_schema(self.schema)
        self.subresources: Mapping[str, Any] = self.version_spec.get("subresources") or {}
        self.printer_columns: list[Mapping[str, Any]] = list(
            self.version_spec.get("additionalPrinterColumns") or []
        )

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def default(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return apply_defaults(self.schema, copy.deepcopy(dict(obj)))

    def validate(
        self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None, *, strict: bool = True
    ) -> list[Cause]:
        """Causes why `obj` (already defaulted) would be refused; empty when it is accepted."""
        causes = _unknown_fields(self.schema, obj, ()) if strict else []
        schema_causes = _schema_errors(self.json_schema, obj) + _list_uniqueness(self.schema, obj)
        skip = {c.field for c in schema_causes}
        return causes + schema_causes + _cel_rules(self.schema, obj, old, skip)

    def admit(
        self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None, *, strict: bool = True
    ) -> dict[str, Any]:
        """Default and validate like the API server; raise Invalid naming the fields."""
        defaulted = self.default(obj)
        if not strict:
            defaulted = prune(self.schema, defaulted)
        causes = self.validate(defaulted, old, strict=strict)
        if causes:
            name = (obj.get("metadata") or {}).get("name", "")
            raise Invalid(f"{self.kind}.{self.group}", name, causes)
        return defaulted


def load_crd(path: Path = MODELDEPLOYMENT_CRD) -> CustomResourceSchema:
    """The CRD in `path` (a YAML file holding one CustomResourceDefinition)."""
    return CustomResourceSchema(yaml.safe_load(path.read_text()))
