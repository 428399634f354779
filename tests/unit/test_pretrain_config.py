"""train.pretrain / train.init_from without Ray: the config rules, unlabelled rows kept, the model and checkpoint
checks before Ray starts, and the warm start (matching tensors loaded, classifier head fresh)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_data import TOKENIZER, synthetic_rows, write_shards  # noqa: E402 - the shard writer of the data tests

from raypipe.config import ConfigError, load_config
from raypipe.data import find_shard_files, prepare_batch, prepare_data
from raypipe.schema import ShardInfo

PRETRAIN = ["train.pretrain=true", "train.metric=val/loss", "train.mode=min"]
TINY_DMAFNET = ("model.params={frame_layers: 1, frame_heads: 2, fusion_layers: 1, fusion_heads: 2, "
                "text_encoder_path: null, text_hidden: 8, text_layers: 1, text_heads: 2, proj_dim: 4}")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.loss.classification=0"], "loss.classification=0 trains no classifier head; keep it > 0 (or set pretrain=true)"),
        (["train.pretrain=true"], "pretrain=true scores no labels: set metric=val/loss and mode=min (got val/f_sco, max)"),
        (PRETRAIN + ["train.loss.contrastive=0", "train.loss.mlm=0", "train.loss.vtm=0"],
         "pretrain=true needs a loss.contrastive / loss.mlm / loss.vtm weight > 0"),
        (PRETRAIN + ["train.loss.unimodal=0.5"],
         "pretrain=true scores no labels: set loss.unimodal=0 (its stream heads are classifiers)"),
    ],
)
def test_pretrain_config_rules(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("test", overrides)
    assert expected in str(info.value) and len(str(info.value).splitlines()) == 1


def test_pretrain_accepts_classification_zero_or_ignores_it() -> None:
    assert load_config("test", PRETRAIN + ["train.loss.classification=0"]).train.pretrain
    assert load_config("test", PRETRAIN).train.loss.classification == 1.0  # accepted, ignored by the objective


def test_a_pretraining_run_registers_only_when_asked() -> None:
    from raypipe.config import RaypipeConfig, config_to_dict
    from raypipe.train import wants_registration

    def wants(overrides: list[str]) -> bool:  # through the dump the workers get, as fit() reads it
        return wants_registration(RaypipeConfig.model_validate(config_to_dict(load_config("test", overrides))))

    assert wants([]) and not wants(["train.register_model=false"])
    assert not wants(PRETRAIN) and wants(PRETRAIN + ["train.register_model=true"])


def test_pretraining_keeps_unlabelled_rows(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "f", 44)
    plain = prepare_data(str(root), task="single_label", val_fraction=0.25)
    kept = prepare_data(str(root), task="single_label", val_fraction=0.25, keep_unlabelled=True)
    assert plain.num_unlabelled == kept.num_unlabelled == 4
    assert kept.num_train + kept.num_val == 44 == plain.num_train + plain.num_val + 4
    fs, files = find_shard_files(str(root))
    table = pq.read_table(files[0])
    for split in ("train", "val"):
        args = dict(info=kept.info, classes=kept.classes, task="single_label", split=split, val_fraction=0.25)
        with_unlabelled = prepare_batch(table, keep_unlabelled=True, **args)
        only_labelled = prepare_batch(table, **args)
        missing = with_unlabelled["label"] == -1
        assert len(with_unlabelled["video_id"]) == len(only_labelled["video_id"]) + missing.sum()
        assert (with_unlabelled["label"][~missing] == only_labelled["label"]).all()
    # a wholly unlabelled set still pretrains (a 1-class head that is never trained)
    rows = synthetic_rows(10)
    rows["label"] = [None] * 10
    spec = prepare_data(str(_write(tmp_path / "u", rows)), task="single_label", val_fraction=0.3,
                        keep_unlabelled=True)
    assert spec.classes == ["unlabelled"] and spec.num_train + spec.num_val == 10


def _write(root: Path, rows: dict) -> Path:
    import pyarrow as pa
    from test_data import INFO

    from raypipe.schema import feature_schema

    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=feature_schema(INFO)), root / "part-00000.parquet")
    return root


@pytest.fixture
def train_data(tmp_path: Path) -> list[str]:
    info = ShardInfo(frame_dim=6, audio_dim=4, text_dim=5, text_len=7, max_frames=8, tokenizer=TOKENIZER)
    root = write_shards(tmp_path / "features", 40, info=info)
    return [f"train.data={root}", f"train.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]


def _checkpoint(path: Path, model_name: str, model: torch.nn.Module, kwargs: dict) -> Path:
    path.mkdir(parents=True)
    torch.save(model.state_dict(), path / "model.pt")
    (path / "meta.json").write_text(json.dumps({"model_name": model_name, "model_kwargs": kwargs}))
    return path


def test_only_models_with_an_auxiliary_head_pretrain_and_init_from_is_checked(train_data: list[str], tmp_path: Path) -> None:
    from raypipe.models import create_model
    from raypipe.train import prepare

    with pytest.raises(ConfigError) as info:
        prepare(load_config("test", train_data + PRETRAIN + ["model.name=mfb", "model.params={}"]))
    assert str(info.value) == ("config error: train.pretrain: model 'mfb' has no contrastive / MLM / VTM head to "
                               "pretrain (models that have one: cavnet, dmafnet)")
    with pytest.raises(ConfigError, match="model 'cavnet' pretrains with its contrastive head.*weighs 0"):
        prepare(load_config("test", train_data + PRETRAIN + ["model.name=cavnet", "model.params={}",
                                                             "train.loss.contrastive=0"]))
    cav, cav_spec, _ = prepare(load_config("test", train_data + PRETRAIN + ["model.name=cavnet", "model.params={}"]))
    assert cav.train.pretrain and cav_spec.keep_unlabelled  # CAV-Net pretrains with its contrastive term alone
    cfg, spec, kwargs = prepare(load_config("test", train_data + PRETRAIN + [TINY_DMAFNET]))
    assert spec.keep_unlabelled and spec.num_train + spec.num_val == 40
    other = _checkpoint(tmp_path / "cav", "cavnet", create_model("cavnet", num_classes=2), {})
    for uri, message in ((other, f"train.init_from: '{other}' holds a 'cavnet' model, not 'dmafnet' (model.name)"),
                         (tmp_path / "nope", "train.init_from: cannot read checkpoint")):
        with pytest.raises(ConfigError) as info:
            prepare(load_config("test", train_data + [TINY_DMAFNET, f"train.init_from={uri}"]))
        assert message in str(info.value) and "\n" not in str(info.value)


def test_init_from_loads_matching_tensors_and_keeps_a_fresh_head(tmp_path: Path) -> None:
    from raypipe.classifier import CheckpointError, init_from_checkpoint, is_head_parameter
    from raypipe.models import create_model

    kw = dict(frame_dim=6, audio_dim=4, vocab_size=50, text_encoder_path=None, frame_layers=1, frame_heads=2,
              fusion_layers=1, fusion_heads=2, text_hidden=8, text_layers=1, text_heads=2, proj_dim=4)
    torch.manual_seed(0)
    pretrained = create_model("dmafnet", num_classes=1, contrastive=True, mlm=True, vtm=True, mask_token_id=3,
                              special_token_ids=[0, 1, 2, 3], **kw)
    ckpt = _checkpoint(tmp_path / "pre", "dmafnet", pretrained, kw)
    torch.manual_seed(1)
    fresh = create_model("dmafnet", num_classes=5, contrastive=True, vtm=True, **kw)  # other head size, no MLM
    head_before = {k: v.clone() for k, v in fresh.state_dict().items() if is_head_parameter(k)}
    counts = init_from_checkpoint(fresh, str(ckpt), model_name="dmafnet")
    pre, got = pretrained.state_dict(), fresh.state_dict()
    body = [k for k in got if not is_head_parameter(k)]
    assert counts["loaded"] == len(body) and counts["skipped_shape"] == 0 and counts["missing"] == 0
    assert counts["skipped_head"] == len(head_before) > 0 and counts["unused"] > 0  # the MLM branch's tensors
    assert all(torch.equal(got[k], pre[k]) for k in body)
    assert all(torch.equal(got[k], v) for k, v in head_before.items())
    with pytest.raises(CheckpointError, match="holds a 'dmafnet' model, not 'cavnet'"):
        init_from_checkpoint(create_model("cavnet", num_classes=2), str(ckpt), model_name="cavnet")
