"""Config plumbing shared by every section: strict models, YAML loading, ``--set`` overrides.

Why strict: a typo in a YAML key must fail before any Ray work starts, not silently fall back to a default
after an hour of embedding. Every section model forbids unknown keys, and :func:`format_validation_error`
turns pydantic's report into one line per problem that names the dotted key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config problem a user can fix; ``str(err)`` is a message naming the offending key."""

    exit_code = 2  # what the CLI (raypipe.cli.run_stage, the one place that maps errors to codes) exits with


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Walk ``loc`` through nested pydantic models and return the field names allowed at its parent."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        # Unwrap Optional[...] / X | None to reach the nested model.
        args = getattr(annotation, "__args__", None)
        if args:
            annotation = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
        current = annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields is not None else None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: ``config error: train.lr: Input should be a valid number (got 'abc')``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int) or True)
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"config error: {key}: unknown key{hint}")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"config error: {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 0.0001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"config error: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {key}: value {raw!r} is not valid YAML ({exc.problem})") from exc
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"optim": {"lr": 1e-3}}}`` -> ``{"train.optim.lr": 1e-3}`` (lists and empty mappings are leaves):
    the dotted keys ``--set``, the sweep's search space and MLflow params all use."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config error: file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {p}: top level must be a mapping, got {type(data).__name__}")
    return data
