"""A quick acceptance check for the argument schemas of most tools, in front of ``jsonschema``.

``jsonschema`` spends 30-60 us validating even a two-property object (its validator walks the schema keyword by
keyword through generic dispatch). Most tool schemas use a handful of keywords, so :func:`compile_check` turns such
a schema once into nested closures that answer "certainly valid" (True) or "not sure" (False). Only a True is
trusted: on False the caller runs the full validator, which also produces the error messages. A schema with any
keyword outside the supported set (``format``, ``pattern``, ``$ref``, combinators, ...) gets no quick check at all.

Each check errs towards "not sure": an ``integer`` must be a Python ``int`` (a ``3.0`` is left to jsonschema),
``enum`` compares only strings, integers, booleans and null of the same Python type, and so on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from typing import Any, cast

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
                          "readOnly", "writeOnly"})
_SUPPORTED = _ANNOTATIONS | {
    "type", "properties", "required", "additionalProperties", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "enum", "items", "minItems", "maxItems",
}


class _Unsupported(Exception):
    """The schema uses something the quick check does not handle."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}
_ENUM_TYPES = (str, int, bool, type(None))


def _length(kind: type, limit: Any, at_least: bool) -> Check:
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise _Unsupported

    def check(v: Any) -> bool:
        if not isinstance(v, kind):
            return True
        size = len(cast("Sized", v))
        return size >= limit if at_least else size <= limit

    return check


def _bound(key: str, limit: Any) -> Check:
    if not _is_number(limit):
        raise _Unsupported

    def check(v: Any) -> bool:
        if not _is_number(v):
            return True
        if key == "minimum":
            return bool(v >= limit)
        if key == "maximum":
            return bool(v <= limit)
        if key == "exclusiveMinimum":
            return bool(v > limit)
        return bool(v < limit)

    return check


def _compile(schema: Any) -> Check:
    if schema is True:
        return lambda _: True
    if not isinstance(schema, Mapping) or not set(schema) <= _SUPPORTED:
        raise _Unsupported
    checks: list[Check] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else kind
        if not isinstance(kinds, list) or not kinds or any(k not in _TYPES for k in kinds):
            raise _Unsupported
        tests = [_TYPES[k] for k in kinds]
        checks.append(tests[0] if len(tests) == 1 else lambda v: any(t(v) for t in tests))
    for key, at_least in (("minLength", True), ("maxLength", False)):
        if key in schema:
            checks.append(_length(str, schema[key], at_least))
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema:
            checks.append(_bound(key, schema[key]))
    if "enum" in schema:
        options = schema["enum"]
        if not isinstance(options, list) or not all(isinstance(o, _ENUM_TYPES) for o in options):
            raise _Unsupported
        allowed = {(type(o), o) for o in options}
        checks.append(lambda v: isinstance(v, _ENUM_TYPES) and (type(v), v) in allowed)
    checks += _object_checks(schema)
    if "items" in schema:
        item = _compile(schema["items"])
        checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
    for key, at_least in (("minItems", True), ("maxItems", False)):
        if key in schema:
            checks.append(_length(list, schema[key], at_least))
    if len(checks) == 1:
        return checks[0]
    return lambda v: all(check(v) for check in checks)


def _object_checks(schema: Mapping[str, Any]) -> list[Check]:
    checks: list[Check] = []
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(k, str) for k in properties):
        raise _Unsupported
    compiled = {name: _compile(sub) for name, sub in properties.items()}
    if compiled:
        def check_properties(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for name, value in v.items():
                check = compiled.get(name)
                if check is not None and not check(value):
                    return False
            return True

        checks.append(check_properties)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _Unsupported
    if required:
        names = tuple(required)
        checks.append(lambda v: not isinstance(v, dict) or all(n in v for n in names))
    extra = schema.get("additionalProperties", True)
    if extra is False:
        known = frozenset(compiled)
        checks.append(lambda v: not isinstance(v, dict) or known.issuperset(v))
    elif extra is not True:
        raise _Unsupported
    return checks


def compile_check(schema: Mapping[str, Any]) -> Check | None:
    """A quick check for ``schema``: True means certainly valid; None when the schema is not supported."""
    try:
        return _compile(schema)
    except _Unsupported:
        return None
