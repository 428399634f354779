"""Champion / challenger without Ray: the policy, the evaluation-set fingerprint, registry aliases (real MLflow on
SQLite) and the refusals, on synthetic feature shards and models built with plain PyTorch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_data import INFO, write_shards

from raypipe.cli import main
from raypipe.config import ConfigError, load_config
from raypipe.data import EVALUATION_SPLIT, DataError, evaluation_rows, fingerprint_rows, held_out_split
from raypipe.promote import PromotionError, decide, promote

CLASSES = ["0101", "0102", "0103", "0201", "0202", "0203"]  # the codes synthetic_rows writes


# ------------------------------------------------------------------------------------------------ policy


def test_policy_needs_the_margin_and_respects_the_guard() -> None:
    champ = {"f_sco": 0.50, "hit@1": 0.60, "top5": 0.90, "n": 20.0}
    kw = {"metric": "f_sco", "min_improvement": 0.05, "max_drop": 0.02}
    assert decide(champ, {**champ, "f_sco": 0.56}, **kw).promote
    assert decide(champ, {**champ, "f_sco": 0.55}, **kw).promote  # exactly at the margin
    small = decide(champ, {**champ, "f_sco": 0.54}, **kw)
    assert not small.promote and "not better enough" in small.reasons[0]
    assert not decide(champ, {**champ, "f_sco": 0.40}, **kw).promote
    # better on the metric but another metric falls too far: the guard says no
    guarded = decide(champ, {**champ, "f_sco": 0.70, "top5": 0.85}, **kw)
    assert not guarded.promote and any("guard: top5 drops by 0.0500" in r for r in guarded.reasons)
    # a drop within max_drop is allowed, and the row count is never guarded
    assert decide(champ, {**champ, "f_sco": 0.70, "top5": 0.89, "n": 3.0}, **kw).promote
    # only the listed guard metrics count
    assert decide(champ, {**champ, "f_sco": 0.70, "top5": 0.5}, guard_metrics=["hit@1"], **kw).promote
    with pytest.raises(PromotionError, match="metric 'map' is not reported"):
        decide(champ, champ, metric="map", min_improvement=0, max_drop=0)


# ---------------------------------------------------------------------------------------- evaluation set


def test_evaluation_rows_are_one_split_sorted_and_fingerprinted(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "features", 40, num_files=3)
    a = evaluation_rows(str(root), task="single_label", classes=CLASSES, val_fraction=0.4, test_fraction=0.3)
    b = evaluation_rows(str(root), task="single_label", classes=CLASSES, val_fraction=0.4, test_fraction=0.3)
    assert a.split == EVALUATION_SPLIT and a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.video_ids == sorted(a.video_ids) and 0 < len(a.video_ids) < 40
    # the test split when the model had one; its val rows (where it chose its epoch) only when it had none
    assert EVALUATION_SPLIT == held_out_split(0.2, False) == held_out_split(0.0, True) == "test"
    assert held_out_split(0.0, False) == "val"
    everything = evaluation_rows(str(root), task="single_label", classes=CLASSES, val_fraction=0.4, split="all")
    assert set(a.video_ids) < set(everything.video_ids) and everything.fingerprint != a.fingerprint
    # another split fraction, other rows: another fingerprint
    assert evaluation_rows(str(root), task="single_label", classes=CLASSES, val_fraction=0.6, test_fraction=0.3).fingerprint != a.fingerprint

    # one feature value of one evaluation row changed on disk -> another fingerprint
    path = sorted(root.glob("*.parquet"))[0]
    table = pq.read_table(path)
    ids = table.column("video_id").to_pylist()
    row = next(i for i, v in enumerate(ids) if v in set(a.video_ids))
    emb = table.column("text_emb").to_pylist()
    emb[row] = [x + 1.0 for x in emb[row]]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("text_emb"), "text_emb", pa.array(emb, table.schema.field("text_emb").type))
    pq.write_table(table, path)
    assert evaluation_rows(str(root), task="single_label", classes=CLASSES, val_fraction=0.4, test_fraction=0.3).fingerprint != a.fingerprint
    # the dims and embedders are part of it too
    assert fingerprint_rows(a.arrays, replace(INFO, embedders={"text": {"model": "x"}})) != a.fingerprint
    with pytest.raises(DataError, match="no labelled rows of split 'test'"):
        evaluation_rows(str(root), task="single_label", classes=["9999", "9998"], val_fraction=0.4, test_fraction=0.3)


# ------------------------------------------------------------------------------------------------ config


def test_config_keeps_training_off_the_champion_and_checks_the_metric() -> None:
    cfg = load_config(None)
    assert (cfg.tracking.alias, cfg.tracking.champion_alias) == ("challenger", "champion")
    assert cfg.label.model_uri.endswith("@champion") and load_config("demo").label.model_uri.endswith("@champion")
    with pytest.raises(ConfigError, match="tracking: .*must differ from tracking.champion_alias"):
        load_config(None, ["tracking.alias=champion"])
    with pytest.raises(ConfigError, match="promote.metric 'f_sco' is not a metric of task 'multi_label'"):
        load_config(None, ["promote.metric=f_sco", "train.task=multi_label", "train.metric=val/map"])
    assert load_config("test", ["promote.metric=hit@1"]).promote.metric == "hit@1"
    assert load_config("test", ["nightly.night=2026-01-31"]).nightly.night == "2026-01-31"  # YAML reads a date
    with pytest.raises(ConfigError, match="nightly.night: must be a folder-safe id"):
        load_config("test", ["nightly.night=a/b"])


def test_policy_metric_resolves_the_default_for_the_classes_as_training_does() -> None:
    from raypipe.promote import _policy_metric

    names, codes = ["cat", "dog"], ["0101", "0102"]
    assert _policy_metric(load_config(None), names) == "f1_macro"  # the default f_sco cannot score names
    assert _policy_metric(load_config(None), codes) == "f_sco"
    assert _policy_metric(load_config(None, ["train.metric=val/hit@1"]), names) == "hit@1"
    assert _policy_metric(load_config(None, ["train.metric=val/f_sco"]), names) == "f_sco"  # asked for: kept
    assert _policy_metric(load_config(None, ["promote.metric=top1"]), codes) == "top1"


# ------------------------------------------------------------------------------ registry and refusals


@pytest.fixture
def registry(tmp_path: Path):
    features = write_shards(tmp_path / "features", 60, num_files=2)
    cfg = load_config("test", [
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.data={features}",
        "tracking.registered_model_name=promote-unit", f"promote.output={tmp_path / 'promotion'}",
        "promote.metric=hit@1", "train.val_fraction=0.4",
    ])
    return cfg, str(features)


def _make(register_checkpoint, cfg, features: str, *, info=INFO, seed: int = 0) -> str:
    return register_checkpoint(cfg, model_name="frames_only", info=info, classes=CLASSES, data=features,
                               val_fraction=0.4, test_fraction=0.3, seed=seed,
                               params={"aggregation": "avgpool", "hidden": 8, "dropout": 0.0})


def test_first_version_is_champion_later_ones_only_challengers(registry, register_checkpoint, tmp_path) -> None:
    from raypipe.tracking import alias_version, make_client, register_run_model

    cfg, features = registry
    client, name = make_client(cfg.tracking), cfg.tracking.registered_model_name
    v1 = _make(register_checkpoint, cfg, features, seed=1)
    assert alias_version(client, name, "champion") == alias_version(client, name, "challenger") == v1 == "1"
    v2 = _make(register_checkpoint, cfg, features, seed=2)
    assert (alias_version(client, name, "champion"), alias_version(client, name, "challenger")) == ("1", v2)
    # registering the same run again (a rerun after a crash) gives its version back, no duplicate
    run_id = client.get_model_version(name, v2).tags["raypipe.run_id"]
    assert register_run_model(cfg, run_id=run_id) == v2
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    # promote compares on one evaluation set (no untrained model gains 2.0 of hit@1: rejected), then is
    # forced, then rolled back; every decision recorded the same way
    def with_promote(**kw):
        return cfg.model_copy(update={"promote": cfg.promote.model_copy(update=kw)})

    report = promote(with_promote(min_improvement=2.0))
    assert (report["decision"], report["champion"]["version"], report["challenger"]["version"]) == ("rejected", "1", "2")
    assert alias_version(client, name, "champion") == "1" and alias_version(client, name, "challenger") == "2"
    assert report["champion"]["metrics"]["n"] == report["challenger"]["metrics"]["n"] == report["evaluation"]["rows"]
    ev = evaluation_rows(features, task="single_label", classes=CLASSES, val_fraction=0.4, test_fraction=0.3)
    assert report["evaluation"]["fingerprint"] == ev.fingerprint and report["evaluation"]["video_ids"] == ev.video_ids
    saved = json.loads((tmp_path / "promotion" / "latest.json").read_text())
    assert saved["decision"] == "rejected" and saved["evaluation"]["fingerprint"] == ev.fingerprint
    assert Path(report["report_path"]).is_file()

    forced = promote(with_promote(force=True, min_improvement=2.0))
    assert forced["decision"] == "forced" and alias_version(client, name, "champion") == "2"
    back = promote(with_promote(to_version=1))
    assert (back["decision"], back["champion"]["version"], back["challenger"]["version"]) == ("rolled_back", "2", "1")
    assert alias_version(client, name, "champion") == "1" and alias_version(client, name, "challenger") == "2"
    same = promote(with_promote(to_version=1))
    assert same["decision"] == "unchanged" and not same["promoted"]
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.`raypipe.stage` = 'promote'")
    by_decision = {r.data.tags["raypipe.decision"]: r for r in runs}
    assert len(runs) == 4 and set(by_decision) == {"rejected", "forced", "rolled_back", "unchanged"}
    for decision in ("rejected", "forced", "rolled_back"):
        r = by_decision[decision]
        assert r.data.tags["raypipe.evaluation_fingerprint"] == ev.fingerprint
        assert r.data.metrics["challenger/hit_at_1"] == saved["challenger"]["metrics"]["hit@1"] or decision == "rolled_back"
        assert {"champion/hit_at_1", "challenger/hit_at_1", "promoted"} <= set(r.data.metrics)


def test_a_model_on_other_feature_dims_is_refused_in_one_line(registry, register_checkpoint, capfd, tmp_path) -> None:
    from raypipe.tracking import alias_version, make_client

    cfg, features = registry
    client, name = make_client(cfg.tracking), cfg.tracking.registered_model_name
    _make(register_checkpoint, cfg, features, seed=1)
    # a challenger trained on features of another frame dim (another frame embedder)
    other = replace(INFO, frame_dim=INFO.frame_dim + 2)
    other_features = str(write_shards(tmp_path / "other_features", 60, info=other))
    v2 = register_checkpoint(cfg, model_name="frames_only", info=other, classes=CLASSES, data=other_features,
                             val_fraction=0.4, params={"aggregation": "avgpool", "hidden": 8})
    with pytest.raises(PromotionError) as err:
        promote(cfg)
    msg = str(err.value)
    assert "\n" not in msg and f"challenger version {v2} (frames_only) was trained on other features" in msg
    assert f"frame_dim {other.frame_dim} (champion v1: {INFO.frame_dim})" in msg
    assert alias_version(client, name, "champion") == "1"

    # the CLI: one error line, exit 2, nothing moved
    capfd.readouterr()
    args = ["promote", "-c", "test"] + [f"--set={o}" for o in (
        f"tracking.tracking_uri={cfg.tracking.tracking_uri}", f"train.data={features}",
        f"tracking.registered_model_name={name}", f"promote.output={cfg.promote.output}")]
    assert main(args) == 2
    err_text = capfd.readouterr().err
    errors = [line for line in err_text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err_text and "trained on other features" in errors[0]
    assert alias_version(client, name, "champion") == "1"
    # a named evaluation set the challenger does not fit: refused too, even with --force
    assert main(args + ["--force", "--data", features]) == 2
    assert "cannot be scored on them" in capfd.readouterr().err
    assert main(args + ["--to-version", "7"]) == 2 and "has no version 7" in capfd.readouterr().err
    assert alias_version(client, name, "champion") == "1"
    # --force switches anyway (e.g. together with a change of embed.*); the mismatch is recorded, not compared
    assert main(args + ["--force"]) == 0 and alias_version(client, name, "champion") == v2
    saved = json.loads((Path(cfg.promote.output) / "latest.json").read_text())
    assert saved["decision"] == "forced" and "metrics" not in saved["champion"]
    assert any("not compared" in r and "frame_dim" in r for r in saved["reasons"])
    assert saved["evaluation"]["data"] == other_features
