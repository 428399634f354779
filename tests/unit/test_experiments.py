"""The experiment files, their row configs and validation, and the table rendering (no Ray)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from raypipe.config import ConfigError, config_to_dict, load_config
from raypipe.data import DataSpec
from raypipe.experiment_tables import markdown, ordering, plot
from raypipe.experiments.report import build_doc
from raypipe.experiments.spec import (
    experiment_names,
    load_experiment,
    row_config,
    runnable_rows,
    trial_key,
    validate_rows,
)
from raypipe.experiments.trial import MemorySplit
from raypipe.schema import ShardInfo

BASE = config_to_dict(load_config(None))
# What the runner adds when the data is the generated corpus (with_class_names): the zero-shot rows embed these.
NAMED = {**BASE, "eval": {"class_names": "/corpus/class_names.txt"}}


def fake_spec(classes=("0101", "0102", "0201", "0202", "0301", "0302")) -> DataSpec:
    """The dims of the test preset's shards (what validation builds the models with); no files needed."""
    info = ShardInfo(frame_dim=512, audio_dim=64, text_dim=384, text_len=128,
                     tokenizer={"vocab_size": 30522, "pad_token_id": 0, "mask_token_id": 103,
                                "special_ids": [0, 100, 101, 102, 103]})
    return DataSpec(uri="/nowhere", files=[], info=asdict(info), classes=list(classes), task="single_label",
                    val_fraction=0.25, num_train=40, num_val=20, test_fraction=0.25, num_test=20)


def test_the_four_papers_are_shipped_with_their_tables():
    assert experiment_names() == ["bilstm", "cavnet", "dmafnet", "mfb"]
    tables = {n: [t.name for t in load_experiment(n).tables] for n in experiment_names()}
    assert tables == {"bilstm": ["table1"], "cavnet": ["table1"], "mfb": ["table1", "table2", "table3"],
                      "dmafnet": ["table2", "table3", "table4", "fig3", "table5"]}
    assert load_experiment("bilstm").table("table1").metrics == ["hit@1", "hit@2"]
    assert load_experiment("cavnet").table("table1").metrics == ["top1", "top5"]


@pytest.mark.parametrize("scale", ["tiny", "paper"])
@pytest.mark.parametrize("name", ["dmafnet", "mfb", "bilstm", "cavnet"])
def test_every_shipped_row_validates_and_builds_on_meta(name, scale):
    exp = load_experiment(name)
    spec = fake_spec()
    spec.task = "multi_label" if (name, scale) == ("mfb", "paper") else "single_label"
    cfgs = validate_rows(NAMED, exp, scale, lambda cfg: spec)
    assert len(cfgs) == len(runnable_rows(exp)) > 0


def test_a_row_moves_model_params_and_losses_together_and_scale_sizes_fill_in():
    exp = load_experiment("dmafnet")
    t3 = exp.table("table3")
    cfg = row_config(BASE, exp, t3, next(r for r in t3.rows if r.name == "T"), "tiny", seed=3)
    assert cfg.model.params["modalities"] == ["text"] and cfg.model.params["fusion_layers"] == 1  # tiny size
    assert (cfg.train.loss.contrastive, cfg.train.loss.vtm, cfg.train.seed) == (0, 0, 3)
    fig3 = exp.table("fig3")
    n6 = row_config(BASE, exp, fig3, fig3.rows[5], "tiny")
    assert n6.model.params["fusion_layers"] == 6  # the row wins over the scale's size
    paper = row_config(BASE, exp, t3, t3.rows[2], "paper")
    assert "fusion_layers" not in paper.model.params and paper.train.epochs == 50  # the paper's sizes (defaults)
    bilstm = load_experiment("bilstm")
    step = row_config(BASE, bilstm, bilstm.tables[0], bilstm.tables[0].rows[0], "paper").train.optim
    assert (step.schedule, step.step_epochs, step.gamma, step.max_decays) == ("step", 5, 0.2, 4)  # the paper's decay
    user = row_config(BASE, exp, t3, t3.rows[2], "tiny", user={"train.epochs": 2})
    assert user.train.epochs == 2  # --set reaches every row


def test_identical_rows_share_a_trial_and_a_change_gets_a_new_one():
    exp = load_experiment("dmafnet")
    full_t3 = row_config(BASE, exp, exp.table("table3"), exp.table("table3").rows[2], "tiny")
    full_t2 = row_config(BASE, exp, exp.table("table2"), exp.table("table2").rows[2], "tiny")
    assert trial_key(full_t3) == trial_key(full_t2)
    other_seed = row_config(BASE, exp, exp.table("table2"), exp.table("table2").rows[2], "tiny", seed=1)
    assert trial_key(other_seed) != trial_key(full_t2)
    with_mlm = row_config(BASE, exp, exp.table("table4"), exp.table("table4").rows[0], "tiny")
    assert trial_key(with_mlm) != trial_key(full_t2)  # tiny scale: MLM only where Table 4 names it
    # DMAFNet-pretrain: the same finetune config as the full model, plus a pretraining stage -> its own trial;
    # its rows in Tables 2 and 5 share one.
    from raypipe.experiments.spec import pretrain_config

    t2, t5 = exp.table("table2"), exp.table("table5")
    pre_row2, pre_row5 = (next(r for r in t.rows if r.name == "dmafnet_pretrain") for t in (t2, t5))
    ft2, ft5 = row_config(BASE, exp, t2, pre_row2, "tiny"), row_config(BASE, exp, t5, pre_row5, "tiny")
    pre2, pre5 = pretrain_config(ft2, exp, t2, pre_row2), pretrain_config(ft5, exp, t5, pre_row5)
    assert pre2 is not None and pre2.train.pretrain and pre2.train.metric == "val/loss" and pre2.train.loss.mlm == 0.25
    assert trial_key(ft2) == trial_key(full_t2) and trial_key(ft2, pre2) != trial_key(full_t2)
    assert trial_key(ft2, pre2) == trial_key(ft5, pre5)
    # eval.class_names is part of a zero-shot row's key only: the runner's default leaves the other keys as they were
    assert trial_key(row_config(NAMED, exp, t2, t2.rows[2], "tiny")) == trial_key(full_t2)
    cav = load_experiment("cavnet")
    zs_row = next(r for r in cav.table("table1").rows if r.name == "zero_shot")
    with pytest.raises(ConfigError, match="row zero_shot: .*eval.zero_shot needs class names"):
        row_config(BASE, cav, cav.table("table1"), zs_row, "tiny")
    other = {**NAMED, "eval": {"class_names": "/elsewhere.txt"}}
    assert trial_key(row_config(NAMED, cav, cav.table("table1"), zs_row, "tiny")) != trial_key(
        row_config(other, cav, cav.table("table1"), zs_row, "tiny"))


def _write(tmp_path: Path, rows: list[dict], **table) -> str:
    doc = {"name": "bad", "paper": "p", "dataset": "d", "scales": {"tiny": {"set": {"train.epochs": 1}}},
           "tables": [{"name": "t1", "title": "T", "metrics": ["f_sco"], "rows": rows, **table}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize(("row", "says"), [
    ({"name": "r2", "set": {"model.params.frame_layerz": 2}}, "row r2: model.params.frame_layerz: not an option"),
    ({"name": "r2", "set": {"model.name": "dmafnet", "model.params.modalities": ["text"]}}, "row r2: model.params: model 'dmafnet' rejects"),
    ({"name": "r2", "set": {"train.optim.lrr": 1}}, "row r2: train.optim.lrr: unknown key"),
    ({"name": "r2", "set": {"model.name": "nope"}}, "row r2: model.name: unknown model 'nope'"),
    ({"name": "r2", "set": {"model.name": "mfb"}, "pretrain": {}}, "row r2: pretrain: model 'mfb' has no"),
    ({"name": "r2", "pretrain": {"train.loss.mlmm": 1}}, "row r2: pretrain: train.loss.mlmm: unknown key"),
    ({"name": "r2", "set": {"eval.zero_shot": True, "train.holdout_classes": ["0102"]}},
     "row r2: eval.zero_shot: model 'dmafnet' has no zero-shot head"),
    ({"name": "r2", "set": {"eval.zero_shot": True, "model.name": "cavnet"}},
     "row r2: eval.zero_shot: set train.holdout_classes"),
    ({"name": "r2", "set": {"eval.zero_shot": True, "model.name": "cavnet", "train.holdout_classes": ["0102"],
                            "train.loss.contrastive": 0}}, "row r2: eval.zero_shot: model 'cavnet' has no zero-shot"),
])
def test_an_invalid_row_is_one_line_naming_experiment_table_and_row(tmp_path, row, says):
    exp = load_experiment(_write(tmp_path, [{"name": "r1"}, row]))
    with pytest.raises(ConfigError) as err:
        validate_rows(NAMED, exp, "tiny", lambda cfg: fake_spec())
    assert str(err.value).startswith("config error: experiment bad, table t1, row r2: ")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_bad_experiment_files_fail_at_load(tmp_path):
    with pytest.raises(ConfigError, match="duplicate row names"):
        load_experiment(_write(tmp_path, [{"name": "r"}, {"name": "r"}]))
    with pytest.raises(ConfigError, match="the runner sets these itself"):
        load_experiment(_write(tmp_path, [{"name": "r", "set": {"train.seed": 1}}]))
    with pytest.raises(ConfigError, match="give the row a `pretrain:` stage"):
        load_experiment(_write(tmp_path, [{"name": "r", "set": {"train.init_from": "/somewhere/checkpoint"}}]))
    with pytest.raises(ConfigError, match="experiment 'nope' does not exist"):
        load_experiment("nope")
    with pytest.raises(ConfigError, match="corruption"):
        load_experiment(_write(tmp_path, [{"name": "r"}], corruptions=[{"name": "c", "corruption": {"kind": "blur"}}]))


def test_cli_rejects_an_invalid_row_before_any_work(tmp_path, capfd, monkeypatch):
    """Exit 2 with the one line, before Ray or the data is touched (--data names a folder that does not exist)."""
    from raypipe.cli import main

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, [{"name": "r1"}, {"name": "r2", "set": {"train.loss.clasification": 1}}])
    code = main(["experiment", path, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 2
    assert "config error: experiment bad, table t1, row r2: train.loss.clasification: unknown key" in err
    assert not (tmp_path / "out").exists()
    import ray

    assert not ray.is_initialized()


def test_memory_split_batches_and_seeded_shuffle():
    arrays = {"video_id": __import__("numpy").arange(10), "x": __import__("numpy").arange(10) * 2}
    split = MemorySplit(arrays)
    plain = [b["video_id"].tolist() for b in split.iter_batches(batch_size=4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    a = [b["video_id"].tolist() for b in split.iter_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=1)]
    b = [b["video_id"].tolist() for b in split.iter_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=1)]
    assert a == b and sorted(sum(a, [])) == list(range(10)) and a != plain


def _results(exp, seeds, values):
    """Fake trial results: each row's test score from ``values[(table, row)]`` + 0.01 * seed."""
    keys, results = {}, {}
    for table, row in runnable_rows(exp):
        for s in seeds:
            key = f"{table.name}-{row.name}-{s}"
            keys[(table.name, row.name, s)] = key
            v = values.get((table.name, row.name), 0.5) + 0.01 * s
            results[key] = {"test": {m: v for m in ("f_sco", "hit@1", "hit@2", "top1", "top5", "gap@20")},
                            "corrupted": {c.name: {"f_sco": v - 0.1} for t in exp.tables for c in t.corruptions},
                            "best_epoch": 2, "seconds": 1.0, "num_test": 20}
    return keys, results


def test_table_shows_ours_beside_the_paper_and_every_gap_says_why(tmp_path):
    exp = load_experiment("dmafnet")
    keys, results = _results(exp, [0, 1], {("table3", "T"): 0.3, ("table3", "V"): 0.4, ("table3", "V+T"): 0.6})
    del results[keys[("table4", "none", 1)]]  # one seed of one row failed
    doc = build_doc(exp, scale="tiny", seeds=[0, 1], keys=keys, results=results, data="/d", ran=[], seconds=1.0)
    md = markdown(doc)
    assert "| T | 0.305 +- 0.005 | 0.5082 |" in md
    assert "F_sco paper (other dataset)" not in md and "f_sco paper (other dataset)" in md
    assert "| VideoBERT | 0.505 +- 0.005 | 0.6271 |" in md
    assert "| (classification only) | 0.500 (1 seed) | 0.6351 |" in md
    t3 = next(t for t in doc["tables"] if t["name"] == "table3")
    assert t3["ordering"]["agree"] and "**Agrees.**" in md
    t5 = next(t for t in doc["tables"] if t["name"] == "table5")
    dm = next(r for r in t5["rows"] if r["name"] == "dmafnet")
    assert dm["ours"]["drop30_frames:f_sco"]["mean"] == pytest.approx(0.405)
    assert dm["paper"]["drop30_frames:f_sco"] == 0.6185
    plot(doc, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_a_zero_shot_row_shows_its_held_out_classes_scores():
    exp = load_experiment("cavnet")
    keys, results = _results(exp, [0, 1], {})
    for s, top1 in ((0, 0.25), (1, 0.75)):  # what run_trial adds for an eval.zero_shot row
        results[keys[("table1", "zero_shot", s)]]["zero_shot"] = {"top1": top1, "top5": 1.0, "n": 8.0}
    doc = build_doc(exp, scale="tiny", seeds=[0, 1], keys=keys, results=results, data="/d", ran=[], seconds=1.0)
    md = markdown(doc)
    assert "| CAV-Net zero-shot (held-out classes) | 0.500 +- 0.250 | 1.000 +- 0.000 |" in md
    assert "| CAV-Net | 0.505 +- 0.005 | 0.505 +- 0.005 |" in md  # the others: their test scores
    assert "| CAV-Net + pretrain | 0.505 +- 0.005 |" in md


def test_a_pending_corruption_column_says_why_in_every_row(tmp_path):
    exp = load_experiment(_write(tmp_path, [{"name": "r1"}], corruptions=[
        {"name": "blur", "corruption": {"kind": "blur"}, "pending": "needs a blur corruption"},
        {"name": "drop", "corruption": {"kind": "drop_tokens", "p": 0.3}}]))
    keys, results = _results(exp, [0], {})
    results[keys[("t1", "r1", 0)]]["corrupted"] = {"drop": {"f_sco": 0.25}}
    md = markdown(build_doc(exp, scale="tiny", seeds=[0], keys=keys, results=results, data="/d", ran=[], seconds=1.0))
    assert "| r1 | 0.500 (1 seed) | not run: needs a blur corruption | 0.250 (1 seed) |" in md


def test_ordering_says_plainly_where_ours_disagree():
    exp = load_experiment("dmafnet")
    keys, results = _results(exp, [0], {("table3", "T"): 0.7, ("table3", "V"): 0.4, ("table3", "V+T"): 0.6})
    doc = build_doc(exp, scale="tiny", seeds=[0], keys=keys, results=results, data="/d", ran=[], seconds=1.0)
    t3 = next(t for t in doc["tables"] if t["name"] == "table3")
    order = ordering(t3)
    assert order["paper"] == ["T", "V", "V+T"] and order["ours"] == ["V", "V+T", "T"]
    assert order["reversed"] == [["T", "V"], ["T", "V+T"]] and not order["agree"]
    assert "**Does not agree**: T above V; T above V+T." in markdown(doc)


def test_zero_shot_class_names_default_to_the_generated_corpus(tmp_path):
    from raypipe.experiments.runner import with_class_names

    out = tmp_path / "runs" / "cavnet-tiny"
    cfg = with_class_names(load_config(None), None, out)  # the corpus this command generates
    assert cfg.eval.class_names == str(tmp_path / "runs" / "tiny_data" / "corpus" / "class_names.txt")
    (tmp_path / "feats").mkdir()
    assert with_class_names(load_config(None), str(tmp_path / "feats"), out).eval.class_names is None  # not that layout
    own = load_config(None, ["eval.class_names=/mine.txt"])
    assert with_class_names(own, None, out).eval.class_names == "/mine.txt"
