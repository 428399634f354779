"""``raypipe experiment`` end to end on the session's feature shards (real Tune trials, real MLflow on SQLite):
every shipped experiment produces its tables with every runnable row filled, and a killed experiment resumes
with only its missing (row, seed) pairs. Two epochs and one seed keep it short; the tables of docs/EXPERIMENTS.md
come from the full ``--scale tiny`` runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raypipe.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(name: str, data: str, out: Path, db: Path, *extra: str) -> int:
    return main(["experiment", name, "--data", data, "--out", str(out), "--seeds", "0",
                 "--set", "train.epochs=2", "--set", f"tracking.tracking_uri=sqlite:///{db}", *extra])


def test_every_experiment_fills_its_tables(feature_shards, corpus, tmp_path, capfd):
    from mlflow import MlflowClient

    cfg, _ = feature_shards
    db = tmp_path / "mlflow.db"
    names = ["--set", f"eval.class_names={corpus.class_names_path}"]  # what CAV-Net's zero-shot row embeds
    for name in ("bilstm", "cavnet", "mfb", "dmafnet"):
        assert _run(name, cfg.embed.output, tmp_path / name, db, *names) == 0, capfd.readouterr().err[-3000:]
        doc = json.loads((tmp_path / name / f"{name}.json").read_text())
        for table in doc["tables"]:
            for row in table["rows"]:
                assert row["status"] == "ok", row  # every row of every shipped table runs (none left pending)
                for col in table["columns"]:
                    cell = row["ours"][col["key"]]
                    assert (cell.get("reason", "").startswith("not run: needs") if col["pending"]
                            else cell["n"] == 1 and 0.0 <= cell["mean"] <= 1.0), (table["name"], row["name"], col)
        md = (tmp_path / name / f"{name}.md").read_text()
        assert "paper (other dataset)" in md and "not run: trial failed" not in md
        assert (tmp_path / name / f"{name}.png").stat().st_size > 10_000
        client = MlflowClient(f"sqlite:///{db}")
        children = client.search_runs(client.get_experiment_by_name("raypipe").experiment_id,
                                      f"tags.`mlflow.parentRunId` = '{doc['mlflow_run_id']}'", max_results=200)
        assert len(children) == sum(len(t["rows"]) for t in doc["tables"])
    dm = json.loads((tmp_path / "dmafnet" / "dmafnet.json").read_text())
    assert dm["trials_total"] < sum(1 for t in dm["tables"] for r in t["rows"] if r["status"] == "ok")  # shared rows
    # DMAFNet-pretrain is two-stage in one trial: pretrained on val/loss, then finetuned from the pretrained tensors.
    table2 = next(t for t in dm["tables"] if t["name"] == "table2")
    (key,) = next(r for r in table2["rows"] if r["name"] == "dmafnet_pretrain")["keys"]
    trial = json.loads((tmp_path / "dmafnet" / "trials" / f"{key}.json").read_text())
    assert trial["pretrain_config"]["train"]["pretrain"] is True and not trial["config"]["train"].get("pretrain")
    pre = trial["pretrain"]
    assert pre["init"]["loaded"] > 0 and pre["init"]["skipped_head"] > 0 and pre["val_loss"] > 0, pre
    # CAV-Net: its own pretraining (contrastive alone) then finetune; zero-shot on the held-out classes' test rows
    cav = json.loads((tmp_path / "cavnet" / "cavnet.json").read_text())
    rows = {r["name"]: r for r in cav["tables"][0]["rows"]}
    trial = json.loads((tmp_path / "cavnet" / "trials" / f"{rows['audio_visual_pretrain']['keys'][0]}.json").read_text())
    assert trial["pretrain_config"]["train"]["pretrain"] is True and trial["pretrain"]["init"]["loaded"] > 0
    trial = json.loads((tmp_path / "cavnet" / "trials" / f"{rows['zero_shot']['keys'][0]}.json").read_text())
    assert trial["zero_shot"]["n"] > 0 and trial["config"]["train"]["holdout_classes"] == ["0102", "0301"]
    assert rows["zero_shot"]["ours"]["top1"]["mean"] == trial["zero_shot"]["top1"]


def test_a_killed_experiment_reruns_only_its_missing_rows(feature_shards, tmp_path, capfd):
    cfg, _ = feature_shards
    out, db = tmp_path / "bilstm", tmp_path / "mlflow.db"
    assert _run("bilstm", cfg.embed.output, out, db) == 0
    first = json.loads((out / "bilstm.json").read_text())
    keys = {r["name"]: r["keys"][0] for r in first["tables"][0]["rows"]}
    kept = out / "trials" / f"{keys['image_audio']}.json"
    kept_text = kept.read_text()
    (out / "trials" / f"{keys['image_audio_text']}.json").unlink()  # as if killed before that trial finished
    capfd.readouterr()
    assert _run("bilstm", cfg.embed.output, out, db) == 0
    err = capfd.readouterr().err
    assert re.search(r"2 \(row, seed\) pairs, 2 distinct trials, 1 already done, 1 to run", err), err[-2000:]
    assert kept.read_text() == kept_text  # the finished row was not trained again
    second = json.loads((out / "bilstm.json").read_text())
    assert second["trials_run"] == 1 and all(r["status"] == "ok" for r in second["tables"][0]["rows"])
