"""Every path in a config resolves from any working directory: Ray workers, Tune trials and job drivers all run
with a cwd of their own, so a relative path that worked in the shell must be made absolute before they start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypipe.config import load_config


def _taxonomy(root: Path) -> Path:
    tax = root / "demo_out" / "corpus" / "taxonomy.json"
    tax.parent.mkdir(parents=True)
    tax.write_text(json.dumps({"level2": {"0101": "a", "0102": "b"}}))
    return tax


def test_sweep_trial_config_finds_every_file_from_the_trial_dir(tmp_path: Path, monkeypatch) -> None:
    """`raypipe tune -c sweep_demo` from the repository root: each trial runs in its own working directory and
    must still find the demo's taxonomy (it did not: the sweep made train.data absolute but not train.taxonomy)."""
    from raypipe.data import read_taxonomy
    from raypipe.tune import apply_params, portable_base

    repo, trial_dir = tmp_path / "repo", tmp_path / "trial"
    tax = _taxonomy(repo)
    trial_dir.mkdir()
    monkeypatch.chdir(repo)
    cfg = load_config("sweep_demo")
    base = portable_base(cfg)
    monkeypatch.chdir(trial_dir)  # Tune runs every trial in a folder of its own
    trial = apply_params(base, {"train.optim.lr": 1e-3})
    assert trial.train.taxonomy == str(tax)
    assert read_taxonomy(trial.train.taxonomy) == ["0101", "0102"]


# String fields that hold no path or URI. A new string field must be added here or declared with a marker type of
# raypipe.config.paths (PathStr, TrackingUri, ModelUri, NameOrPath), or this test fails: no path can be missed.
NOT_PATHS = {
    "ray.decode_resource",  # a Ray custom resource name
    "ray.address",  # a Ray address (auto, ray://host:port, http://...): not resolved against the cwd
    "storage.endpoint_url", "storage.region",
    "corpus.id_prefix", "demo.label_id_prefix",
    "embed.source.manifest_uri_column", "embed.source.manifest_id_column", "embed.source.manifest_text_column",
    "embed.source.manifest_labels_column",
    # JSON keys of WebDataset samples (embed.source.webdataset)
    "embed.source.webdataset.title_keys", "embed.source.webdataset.asr_keys", "embed.source.webdataset.ocr_keys",
    "embed.source.webdataset.label_keys",
    "embed.frames.model",  # a timm model name
    "embed.asr.vocabulary",  # words for the ASR engine
    "model.name",
    "train.metric", "train.run_name", "train.holdout_classes",
    "tune.name", "tune.metric",
    "tracking.experiment", "tracking.registered_model_name", "tracking.alias", "tracking.parent_run_id",
    "tracking.champion_alias", "promote.metric", "promote.split", "promote.guard_metrics", "nightly.night",
    # containers with string keys or items
    "embed.source.extensions", "model.params", "tune.search_space",
    "ray.runtime_env",  # passed to Ray as it is; Ray resolves its working_dir against the driver's cwd itself
}


def _string_leaves(model_cls, prefix: str = ""):
    """(dotted key, field info) of every field whose type mentions str (str, str | None, list[str], dict[str, ...]),
    through nested sections."""
    from pydantic import BaseModel

    for name, info in model_cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _string_leaves(ann, f"{key}.")
        elif _mentions_str(ann):
            yield key, info


def _mentions_str(ann) -> bool:
    from typing import get_args

    return ann is str or any(_mentions_str(a) for a in get_args(ann))


def test_every_string_field_is_declared_a_path_or_listed_as_not_one() -> None:
    from raypipe.config import RaypipeConfig
    from raypipe.config.paths import marker_of

    leaves = dict(_string_leaves(RaypipeConfig))
    marked = {k for k, info in leaves.items() if marker_of(info) is not None}
    unclassified = set(leaves) - marked - NOT_PATHS
    assert not unclassified, f"declare these as paths (raypipe.config.paths) or add them to NOT_PATHS: {unclassified}"
    assert not marked & NOT_PATHS and set(leaves) >= NOT_PATHS  # the list is kept honest both ways
    # the walker that resolves paths finds exactly the declared ones
    from raypipe.config.paths import path_fields

    assert {k for k, *_ in path_fields(RaypipeConfig())} == marked
    assert {"train.taxonomy", "train.data", "embed.source.annotations", "label.class_names"} <= marked


def test_resolve_paths_makes_every_path_field_absolute(tmp_path: Path, monkeypatch) -> None:
    from raypipe.config import RaypipeConfig
    from raypipe.config.paths import path_fields, resolve_paths

    (tmp_path / "local_text_model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = RaypipeConfig()
    relative = {}
    for key, section, name, marker in path_fields(cfg):
        value = {"tracking_uri": "sqlite:///rel/mlflow.db", "name_or_path": "local_text_model"}.get(
            marker.kind, f"rel/{key}"
        )
        listed = isinstance(getattr(section, name), list)  # a list of paths (eval.models): item by item
        setattr(section, name, [value] if listed else value)
        relative[key] = value
    resolved = {key: getattr(section, name) for key, section, name, _ in path_fields(resolve_paths(cfg))}
    for key, value in resolved.items():
        expected = str(tmp_path / relative[key].removeprefix("sqlite:///"))
        got = value[0] if isinstance(value, list) else value
        assert got.removeprefix("sqlite:///") == expected, key
    assert resolve_paths(resolve_paths(cfg)) == resolve_paths(cfg)  # idempotent


def test_remote_uris_and_names_stay_as_they_are() -> None:
    from raypipe.config.paths import absolute

    assert absolute("s3://b/features", "path") == "s3://b/features"
    assert absolute("models:/m@candidate", "model_uri") == "models:/m@candidate"
    assert absolute("http://mlflow:5000", "tracking_uri") == "http://mlflow:5000"
    assert absolute("minilm", "name_or_path") == "minilm"  # a registered name, no such folder here
    assert absolute("sqlite:////abs/m.db", "tracking_uri") == "sqlite:////abs/m.db"


def test_the_default_config_names_no_demo_location() -> None:
    from raypipe.config import RaypipeConfig

    dumped = RaypipeConfig().model_dump_json()
    assert "demo_out" not in dumped


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["embed"], "raypipe embed needs embed.source.uri (--source or --set embed.source.uri=...), embed.output"),
        (["embed", "--source", "x"], "raypipe embed needs embed.output (--output or --set embed.output=...);"),
        (["label", "--output", "o"], "raypipe label needs embed.source.uri (--source or"),
        (["train"], "raypipe train needs train.data (--data or --set train.data=...)"),
        (["eval"], "raypipe eval needs eval.data (--data or --set eval.data=...)"),
        (["tune"], "raypipe tune needs train.data (--set train.data=...)"),
        (["corpus"], "raypipe corpus needs corpus.out (--out or --set corpus.out=...)"),
    ],
)
def test_a_stage_without_its_paths_names_the_flag(argv, expected, capsys) -> None:
    from raypipe.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_the_cli_hands_stages_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    """What `raypipe <stage>` passes on: the config with relative paths resolved against the shell's cwd."""
    from raypipe import cli

    seen = {}
    monkeypatch.setattr(cli, "_stage_runner", lambda stage: lambda cfg: seen.setdefault("cfg", cfg) and 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "-c", "demo", "--data", "feats"]) == 0
    cfg = seen["cfg"]
    assert cfg.train.data == str(tmp_path / "feats") and cfg.train.taxonomy == str(tmp_path / "demo_out/corpus/taxonomy.json")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/demo_out/mlflow.db"


def test_a_resolved_default_reaches_the_workers_config(tmp_path: Path, monkeypatch) -> None:
    """With no preset, the default tracking URI is resolved on the driver; the dump handed to Ray Train workers
    (``config_to_dict``: only what was set) must carry it, or workers open another SQLite file and lose the run."""
    from raypipe.config import config_to_dict
    from raypipe.config.paths import resolve_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dumped = config_to_dict(resolve_paths(load_config(None, ["train.data=features"])))
    assert dumped["tracking"]["tracking_uri"] == f"sqlite:///{tmp_path / 'raypipe_runs' / 'mlflow.db'}"
    assert dumped["train"]["data"] == str(tmp_path / "features")
