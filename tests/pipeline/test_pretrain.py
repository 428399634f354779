"""train.pretrain then train.init_from on the session's feature shards: the pretraining run optimises only the
auxiliary objective and claims no test metrics, and the finetune starts from its weights (classifier head fresh)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from raypipe.classifier import is_head_parameter
from raypipe.train import fit


def test_pretrain_then_finetune_starts_from_the_pretrained_weights(feature_shards, test_config_factory) -> None:
    data = feature_shards[0].embed.output
    # Two DDP workers (the frozen head must not stall DDP's gradient reduction); test rows exist but stay unread.
    pre = fit(test_config_factory(
        f"train.data={data}", "train.pretrain=true", "train.metric=val/loss", "train.mode=min", "train.epochs=1",
        "train.test_fraction=0.2", "tracking.enabled=false", "train.run_name=pretrain", name="pretrain"))
    (h,) = pre.history
    assert all(math.isfinite(h[f"train/loss_{t}"]) for t in ("contrastive", "mlm", "vtm"))
    assert "train/loss_classification" not in h and math.isfinite(h["val/loss"]) and "val/f_sco" not in h
    assert pre.test_metrics == {} and pre.num_test == 0
    meta = json.loads((Path(pre.best_checkpoint) / "meta.json").read_text())
    assert meta["pretrain"] is True and meta["init_from"] is None

    # A learning rate of 1e-12 leaves the weights where the finetune started (AdamW moves each by ~lr per step).
    fine = fit(test_config_factory(
        f"train.data={data}", f"train.init_from={pre.best_checkpoint}", "train.epochs=1", "train.seed=1",
        "train.optim={lr: 1.0e-12, text_lr: 1.0e-12, warmup_steps: 0, weight_decay: 0.0}", "tracking.enabled=false",
        "train.run_name=finetune", name="finetune"))
    before = torch.load(Path(pre.best_checkpoint) / "model.pt", map_location="cpu", weights_only=True)
    after = torch.load(Path(fine.best_checkpoint) / "model.pt", map_location="cpu", weights_only=True)
    body = [k for k in after if not is_head_parameter(k)]
    head = [k for k in after if is_head_parameter(k)]
    assert fine.init_from is not None and fine.init_from["loaded"] == len(body) and fine.init_from["skipped_head"] == len(head) > 0
    for k in body:
        assert torch.allclose(after[k].float(), before[k].float(), atol=1e-9, rtol=0), k
    # the head is fresh (seed 1), not the pretraining run's (seed 0, frozen there)
    assert any(not torch.allclose(after[k], before[k]) for k in head)
