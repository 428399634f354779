"""Champion and challenger end to end on the session's feature shards: real training runs register challengers,
``promote`` decides on one fingerprinted evaluation set, and the label job follows the champion and only it.

One scenario, in the order a platform team lives it (each phase needs the registry state the previous left):
a weak first model becomes champion; a nightly retrain registers a strong challenger, promotes it (after a
crash right after the promotion, resubmitted) and relabels everything with it; a worse challenger is rejected
and the label job keeps the champion; a rollback to version 1 relabels everything with version 1 again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypipe.label import label_videos, read_predictions
from raypipe.tracking import alias_version, make_client

WEAK = ["model.name=frames_only", "model.params={aggregation: avgpool, hidden: 16}", "train.epochs=1"]
STRONG = ["model.name=text_only", "model.params={hidden: 32}", "train.epochs=12"]
LABELLED = 6  # videos the label job sees (embed.source.limit): enough to see a relabel, cheap to decode


def _with(cfg, *overrides: str):
    from raypipe.config import validate_config
    from raypipe.config.base import apply_override, parse_override

    data = cfg.model_dump(exclude_unset=True)
    for text in overrides:
        apply_override(data, *parse_override(text))
    return validate_config(data)


def _aliases(cfg) -> tuple[str | None, str | None]:
    client, name = make_client(cfg.tracking), cfg.tracking.registered_model_name
    return alias_version(client, name, "champion"), alias_version(client, name, "challenger")


def _latest_versions(cfg) -> dict[str, str]:
    return {r["video_id"]: r["model_version"] for r in read_predictions(cfg.label.output).to_pylist()}


@pytest.fixture(scope="module")
def promo_cfg(ray_session, feature_shards, corpus, test_config_factory):
    feat_cfg, _ = feature_shards
    return test_config_factory(
        f"embed.source.uri={corpus.videos_dir}", f"embed.source.annotations={corpus.annotations_path}",
        f"embed.source.limit={LABELLED}", "embed.fuse_encoders=false",
        f"embed.output={feat_cfg.embed.output}", f"train.data={feat_cfg.embed.output}",
        "train.num_workers=1", "tracking.registered_model_name=promote-e2e", "label.model_uri=models:/promote-e2e@champion",
        # All labelled rows, not only the ~11 held-out ones of this 40-video corpus: there one row is 0.09 of f_sco,
        # too coarse for a margin, and the held-out split changes when it gains a test part. Which rows is the
        # evaluation set's business (raypipe.data.evaluation_rows); the decision on them is what is tested here.
        "promote.split=all", "promote.min_improvement=0.05", "promote.max_drop=0.2", name="promote",
    )


def test_champion_challenger_promotion_rejection_rollback_and_the_label_job(
    promo_cfg, register_checkpoint, monkeypatch
) -> None:
    from raypipe.data import evaluation_rows
    from raypipe.nightly import CRASH_ENV, NightlyCrash, run_night
    from raypipe.promote import promote
    from raypipe.train import fit

    cfg = promo_cfg
    # 1. The first model ever registered becomes champion (and challenger); the label job uses it.
    weak = fit(_with(cfg, *WEAK, "train.run_name=weak"))
    assert weak.registered_model_version == "1" and _aliases(cfg) == ("1", "1")
    first = label_videos(cfg)
    assert first["model"]["version"] == "1" and first["to_label"] == LABELLED
    assert set(_latest_versions(cfg).values()) == {"1"} and len(_latest_versions(cfg)) == LABELLED

    # 2. A nightly retrain: trains a strong challenger, promotes it, labels with the champion. The job crashes
    #    right after the promotion; the resubmitted night skips the training, re-decides nothing and labels.
    night = _with(cfg, *STRONG, "nightly.retrain=true", "nightly.embed=false", "nightly.night=n1",
                  f"nightly.output={Path(cfg.label.output).parent / 'nightly'}")
    monkeypatch.setenv(CRASH_ENV, "promote")
    with pytest.raises(NightlyCrash):
        run_night(night)
    monkeypatch.delenv(CRASH_ENV)
    assert _aliases(cfg) == ("2", "2")  # training only made it challenger; the promotion moved the champion
    report = json.loads((Path(cfg.promote.output) / "latest.json").read_text())
    assert report["decision"] == "promoted" and report["champion"]["version"] == "1"
    champ, chall = report["champion"]["metrics"], report["challenger"]["metrics"]
    metric = report["metric"]
    assert metric == "f_sco" and chall[metric] - champ[metric] >= 0.05
    assert champ["n"] == chall["n"] == report["evaluation"]["rows"] > 0
    # the evaluation set both were scored on: the challenger's held-out rows, fingerprinted
    from raypipe.classifier import load_classifier

    clf = load_classifier("models:/promote-e2e/2", tracking_uri=cfg.tracking.tracking_uri)
    ev = evaluation_rows(cfg.train.data, task=clf.task, classes=clf.classes, val_fraction=clf.meta["val_fraction"],
                         split="all")
    assert report["evaluation"]["split"] == "all" and len(ev.video_ids) > 20
    assert report["evaluation"]["fingerprint"] == ev.fingerprint and report["evaluation"]["video_ids"] == ev.video_ids

    summary = run_night(night)
    assert summary["attempts"] == 2 and summary["steps"]["train"]["registered_version"] == "2"
    assert summary["steps"]["promote"]["decision"] == "unchanged"  # the rerun found v2 already champion
    assert summary["champion_version"] == "2" and summary["labelled_tonight"] == sum(
        r["status"] == "ok" for r in read_predictions(cfg.label.output).to_pylist())
    latest = _latest_versions(cfg)
    assert len(latest) == LABELLED and set(latest.values()) == {"2"}  # everything relabelled by the new champion
    assert run_night(night) == summary  # a finished night stays finished

    # 3. A worse challenger (an untrained model) is not promoted; the label job keeps the champion.
    worse = register_checkpoint(cfg, model_name="frames_only", info=clf.shard_info, classes=clf.classes,
                                data=cfg.train.data, val_fraction=clf.meta["val_fraction"],
                                params={"aggregation": "avgpool", "hidden": 16})
    assert worse == "3" and _aliases(cfg) == ("2", "3")
    rejected = promote(cfg)
    assert rejected["decision"] == "rejected" and not rejected["promoted"]
    assert rejected["challenger"]["metrics"][metric] - rejected["champion"]["metrics"][metric] < 0.05
    assert rejected["evaluation"]["fingerprint"] == ev.fingerprint
    assert _aliases(cfg) == ("2", "3")
    kept = label_videos(cfg)
    assert kept["model"]["version"] == "2" and kept["to_label"] == 0 and set(_latest_versions(cfg).values()) == {"2"}

    # 4. Rollback to version 1, recorded like any decision; the next label run relabels everything with it.
    back = promote(_with(cfg, "promote.to_version=1"))
    assert back["decision"] == "rolled_back" and _aliases(cfg) == ("1", "3")
    assert back["evaluation"]["fingerprint"] == ev.fingerprint
    relabel = label_videos(cfg)
    assert relabel["model"]["version"] == "1" and relabel["to_label"] == LABELLED
    assert set(_latest_versions(cfg).values()) == {"1"} and len(_latest_versions(cfg)) == LABELLED
    client = make_client(cfg.tracking)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.`raypipe.stage` = 'promote'")
    assert sorted(r.data.tags["raypipe.decision"] for r in runs) == ["promoted", "rejected", "rolled_back", "unchanged"]
