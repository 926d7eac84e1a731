"""Request bodies: a small declarative spec per endpoint, used both to check bodies (clear
400s naming the field, unknown fields refused) and to describe them in OpenAPI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Field:
    """One body field: its JSON type, whether it is required or may be null, and for
    strings the allowed values."""

    type: str
    required: bool = False
    nullable: bool = False
    enum: tuple[str, ...] = ()
    description: str = ""

    def schema(self) -> dict[str, Any]:
        """The field as a JSON Schema."""
        out: dict[str, Any] = {"type": [self.type, "null"] if self.nullable else self.type}
        if self.enum:
            out["enum"] = list(self.enum)
        if self.description:
            out["description"] = self.description
        return out


Spec = dict[str, Field]


def parse_json(raw: bytes) -> Any:
    """Decode a JSON body or raise a 400 saying where it is broken."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def check_body(body: Any, spec: Spec) -> dict[str, Any]:
    """Check a decoded body against ``spec``; return it (absent fields missing)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {_type_name(body)}")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise BadRequest(
            f"unknown field {unknown[0]!r}; allowed fields: {', '.join(sorted(spec))}",
            field=unknown[0],
        )
    for name, f in spec.items():
        if name not in body:
            if f.required:
                raise BadRequest(f"field {name!r} is required ({f.type})", field=name)
            continue
        value = body[name]
        if value is None:
            if not f.nullable:
                raise BadRequest(f"field {name!r} must be {_a(f.type)}, not null", field=name)
            continue
        ok = isinstance(value, _JSON_TYPES[f.type]) and not isinstance(value, bool)
        if not ok:
            raise BadRequest(
                f"field {name!r} must be {_a(f.type)}, not {_type_name(value)}", field=name
            )
        if f.enum and value not in f.enum:
            raise BadRequest(
                f"field {name!r} must be one of {', '.join(f.enum)}; got {value!r}", field=name
            )
    return body


def spec_schema(spec: Spec) -> dict[str, Any]:
    """A body spec as a JSON Schema object."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: f.schema() for name, f in spec.items()},
        "required": [name for name, f in spec.items() if f.required],
    }


def _a(json_type: str) -> str:
    return f"an {json_type}" if json_type[0] in "aeiou" else f"a {json_type}"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- the bodies of the API ----------------------------------------------------------------

INCARNATION = Field("integer", required=True, description="the writer's incarnation (fencing)")
NOTICE = Field("object", nullable=True, description="the preemption notice, as the client saw it")

CREATE_RUN: Spec = {
    "id": Field("string", nullable=True, description="run ID; generated when absent"),
    "resume": Field("string", enum=("never", "allow", "must"), description="default never"),
    "config": Field("object", nullable=True),
    "instance_id": Field("string", nullable=True),
    "host": Field("string", nullable=True),
    "sweep_id": Field("string", nullable=True),
    "meta": Field("object", nullable=True),
}
HEARTBEAT: Spec = {"incarnation": INCARNATION}
LOG: Spec = {
    "incarnation": INCARNATION,
    "step": Field("integer", nullable=True, description="default: last step + 1"),
    "data": Field("object", required=True),
}
PREEMPTING: Spec = {"incarnation": INCARNATION, "notice": NOTICE}
FINISH: Spec = {"incarnation": INCARNATION, "exit_code": Field("integer", required=True)}
INSTANCE_PREEMPTING: Spec = {"notice": NOTICE}
