"""Which config fields hold a path or URI, and the one function that makes them all absolute.

Why: Ray workers, Tune trials and ``ray job submit`` drivers each run with a working directory of their own, so a
relative path that worked in the user's shell (``demo_out/features``) points elsewhere there. Every field that
holds a path is declared with one of the marker types below; :func:`resolve_paths` walks the config tree and
makes each of them absolute against the current working directory, once, before a stage hands the config on.
Because the walk reads the type annotations, a path field added later is resolved as soon as it is declared with
a marker, and ``tests/unit/test_paths.py`` fails for a string field that is neither a marker nor listed there as
"not a path".

Kinds:

- ``PathStr``: a local path or a remote URI (``s3://...``); local ones become absolute, remote ones stay.
- ``TrackingUri``: an MLflow tracking URI; ``sqlite:///relative.db`` and bare paths become absolute.
- ``ModelUri``: ``models:/name@alias`` / ``models:/name/version`` stay; a checkpoint path becomes absolute.
- ``NameOrPath``: a registered name (``minilm``) or a local folder; only an existing local path is resolved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel

PathKind = Literal["path", "tracking_uri", "model_uri", "name_or_path"]


@dataclass(frozen=True)
class PathMarker:
    """Annotation metadata: this string field holds a path/URI of ``kind`` (see the module docstring)."""

    kind: PathKind


PathStr = Annotated[str, PathMarker("path")]
TrackingUri = Annotated[str, PathMarker("tracking_uri")]
ModelUri = Annotated[str, PathMarker("model_uri")]
NameOrPath = Annotated[str, PathMarker("name_or_path")]


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def absolute_path(uri: str | None) -> str | None:
    """Remote URIs unchanged, local paths absolute."""
    if uri is None or _is_remote(uri):
        return uri
    return _local(uri)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative.db`` (or a bare path) -> absolute; server URIs (http, databricks, ...) unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    if "://" not in uri and not uri.startswith("databricks"):
        return os.path.abspath(uri)
    return uri


def absolute(value: str | None, kind: PathKind) -> str | None:
    """``value`` resolved against the current working directory according to its ``kind``."""
    if value is None:
        return None
    if kind == "tracking_uri":
        return absolute_tracking_uri(value)
    if kind == "model_uri":
        return value if value.startswith("models:") else absolute_path(value)
    if kind == "name_or_path":
        return _local(value) if not _is_remote(value) and os.path.exists(value) else value
    return absolute_path(value)


def marker_of(field_info: Any) -> PathMarker | None:
    """The :class:`PathMarker` of a pydantic field (``PathStr`` or ``PathStr | None``), if it has one."""
    for meta in getattr(field_info, "metadata", ()):
        if isinstance(meta, PathMarker):
            return meta
    for arg in get_args(getattr(field_info, "annotation", None)):
        if get_origin(arg) is Annotated:
            for meta in arg.__metadata__:
                if isinstance(meta, PathMarker):
                    return meta
    return None


def path_fields(model: BaseModel, prefix: str = "") -> list[tuple[str, BaseModel, str, PathMarker]]:
    """Every path field of ``model`` and its sub-sections: ``(dotted key, owning section, field name, marker)``."""
    out: list[tuple[str, BaseModel, str, PathMarker]] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.extend(path_fields(value, f"{key}."))
            continue
        marker = marker_of(info)
        if marker is not None:
            out.append((key, model, name, marker))
    return out


def resolve_paths(cfg: Any) -> Any:
    """A copy of ``cfg`` (any config model) with every path field absolute; idempotent.

    Only fields that hold a value and change are assigned (assigning marks a field as set, so a dump with
    ``exclude_unset``, what the sweep and exported configs use, then carries the absolute value).
    """
    cfg = cfg.model_copy(deep=True)
    for key, section, name, marker in path_fields(cfg):
        value = getattr(section, name)
        # A list of paths (eval.models) is resolved item by item.
        resolved = [absolute(v, marker.kind) for v in value] if isinstance(value, list) else absolute(value, marker.kind)
        if resolved != value:
            setattr(section, name, resolved)
            _mark_set(cfg, key)
    return cfg


def _mark_set(cfg: Any, key: str) -> None:
    """Mark every section on the way to ``key`` as set: ``exclude_unset`` drops a whole section its parent never
    had set, so a resolved default (``tracking.tracking_uri`` with no preset) would not reach Ray workers."""
    node = cfg
    for part in key.split(".")[:-1]:
        node.model_fields_set.add(part)
        node = getattr(node, part)


# stage -> the path keys it cannot run without, with the command-line flag that sets each (None: only --set).
REQUIRED: dict[str, tuple[tuple[str, str | None], ...]] = {
    "corpus": (("corpus.out", "--out"),),
    "embed": (("embed.source.uri", "--source"), ("embed.output", "--output")),
    "train": (("train.data", "--data"),),
    "eval": (("eval.data|train.data", "--data"),),
    "tune": (("train.data", None),),
    "label": (("embed.source.uri", "--source"), ("label.output", "--output")),
    "demo": (
        ("corpus.out", None), ("embed.output", None), ("label.output", None),
        ("demo.label_corpus_out", None), ("demo.report", None),
    ),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def missing_paths_message(stage: str, cfg: Any) -> str | None:
    """One line naming every required path of ``stage`` that is unset and how to set it, or None.

    The defaults name no input or output location on purpose (a stage run on another corpus must never read
    the demo's annotations or write into its folders), so a stage without them stops here, before any work.
    """
    missing = []
    for keys, flag in REQUIRED.get(stage, ()):
        alternatives = keys.split("|")
        if all(_get(cfg, k) is None for k in alternatives):
            key = alternatives[0]
            how = f"{flag} or --set {key}=..." if flag else f"--set {key}=..."
            missing.append(f"{key} ({how})")
    if not missing:
        return None
    return f"config error: raypipe {stage} needs {', '.join(missing)}; the demo preset (-c demo) sets them all"
