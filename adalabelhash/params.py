"""params.yaml: one section per step, each parsed into a typed dataclass.

DVC and KFP read the same file; `parse_section` turns a section (a plain dict, from YAML or
from a KFP pipeline parameter) into the step's dataclass and rejects unknown keys and wrong
types with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from adalabelhash.errors import UserError

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def require_finite(obj: Any) -> None:
    """Raise ValueError naming the first float field of dataclass `obj` that is NaN or infinite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def load_section(cls: type[T], name: str, path: str | Path = DEFAULT_PARAMS) -> T:
    params = load_params(path)
    if name not in params:
        raise UserError(f"{path}: missing section '{name}'")
    return parse_section(cls, params[name], name)


def parse_section(cls: type[T], values: Any, name: str) -> T:
    """Build dataclass `cls` from `values`, checking keys and types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"params {name}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"params {name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"params {name}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"params {where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"params {where}: expected a list, got {value!r}")
        return origin(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"params {where}: expected a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"params {where}: must be a finite number, got {value}")
        return float(value)
    if hint is Any:
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"params {where}: expected {hint.__name__}, got {value!r}")
    return value


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'bits': 32}} -> {'train.bits': 32}; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
