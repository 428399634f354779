"""The training GPU path, checked without a GPU (issue 21): worker-group resources and backend, fractional GPUs
for Tune trials, the AMP loss-scaler restore when train.amp changes on resume, and a real training step whose
autocast follows the device. No Ray is started: the configs Ray Train would get are inspected directly.
"""

from __future__ import annotations

import pytest
import torch
from test_models import ALL_AUX, build, make_batch, objective

from raypipe.config import load_config
from raypipe.train import worker_group_configs
from raypipe.train_worker import amp_setup, forward_backward, optimizer_step, restore_scaler


def test_gpu_workers_get_nccl_and_one_gpu_each() -> None:
    cfg = load_config("test", ["train.use_gpu=true", "train.num_workers=4"])
    torch_cfg, scaling = worker_group_configs(cfg.train)
    assert torch_cfg.backend == "nccl"
    assert scaling.use_gpu and scaling.num_workers == 4
    assert scaling.resources_per_worker == {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0}


def test_cpu_workers_get_gloo_and_no_gpu() -> None:
    from raypipe.resources import Cluster
    from raypipe.runtime import apply_plan, stage_plan

    cfg = load_config("test")  # train.use_gpu / cpus_per_worker are "auto" until planned for a cluster
    torch_cfg, scaling = worker_group_configs(apply_plan(cfg, stage_plan(cfg, "train", Cluster.single(4))).train)
    assert torch_cfg.backend == "gloo" and not scaling.use_gpu and "GPU" not in scaling.resources_per_worker


def test_fractional_gpus_for_tune_trials() -> None:
    from raypipe.tune import portable_base

    cfg = load_config("test", ["tune.resources.gpus_per_worker=0.25"])
    train = portable_base(cfg)["train"]
    assert train["use_gpu"] is True and train["gpus_per_worker"] == 0.25
    trial = load_config("test", [f"train.{k}={v}" for k, v in train.items() if k in ("use_gpu", "gpus_per_worker")])
    assert worker_group_configs(trial.train)[1].resources_per_worker["GPU"] == 0.25
    assert portable_base(load_config("test", ["tune.resources.gpus_per_worker=0"]))["train"]["use_gpu"] is False


def test_find_unused_parameters_is_off_by_default_and_configurable() -> None:
    assert load_config("test").train.find_unused_parameters is False
    assert load_config("test", ["train.find_unused_parameters=true"]).train.find_unused_parameters is True


def test_resume_with_another_amp_mode_keeps_the_scaler_loadable() -> None:
    """bf16 -> fp16 on resume: the checkpoint holds a disabled scaler's empty state, which GradScaler refuses."""
    bf16_state = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**16)
    with pytest.raises(RuntimeError, match="empty"):  # what the trainer did before: the resume crashed
        fp16.load_state_dict(bf16_state)
    restore_scaler(fp16, bf16_state)
    assert fp16.get_scale() == 2.0**16  # starts fresh
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=128.0).state_dict()
    restore_scaler(fp16, saved)
    assert fp16.get_scale() == 128.0  # same mode: the scale carries over
    restore_scaler(torch.amp.GradScaler("cpu", enabled=False), saved)  # fp16 -> bf16: ignored, no error


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_follows_the_device() -> None:
    cpu_autocast, cpu_scaler = amp_setup(torch.device("cpu"), "bf16")
    ctx = cpu_autocast()
    assert ctx.device == "cpu" and not ctx._enabled and not cpu_scaler.is_enabled()  # CPU workers train in fp32
    cuda_autocast, _ = amp_setup(torch.device("cuda"), "bf16")
    ctx = cuda_autocast()
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16


def test_one_cpu_training_step() -> None:
    """The loop's own step functions on a real model: loss finite, every parameter moves, fp32 on CPU."""
    torch.manual_seed(0)
    model = build("dmafnet", ALL_AUX).train()
    obj = objective("dmafnet", model, ALL_AUX)
    autocast, scaler = amp_setup(torch.device("cpu"), "fp16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total, terms = forward_backward(
        model, make_batch(), obj, autocast=autocast, scaler=scaler, grad_accum=1, sync_grads=True
    )
    assert total.dtype == torch.float32 and torch.isfinite(total) and set(terms) >= {"classification"}
    optimizer_step(model, optimizer, scheduler, scaler, grad_clip=1.0)
    frozen = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not frozen, f"parameters that did not move: {frozen}"


# ------------------------------------------------------------------------------- validation on every rank


class _TextHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.lin(batch["text_emb"])}


def _val_stream() -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(3)
    sizes = [4, 4, 4, 4, 2]  # 5 batches: rank 0 scores 3, rank 1 scores 2
    return [
        {"text_emb": rng.normal(size=(n, 6)).astype(np.float32), "label": rng.integers(0, 3, n),
         "video_id": np.array([f"v{b}_{i}" for i in range(n)])}
        for b, n in enumerate(sizes)
    ]


def _run_validate(rank: int, world: int) -> tuple:
    from contextlib import nullcontext

    from raypipe.losses import FusionObjective
    from raypipe.train_worker import validate_batches

    scored: list[int] = []
    model = _TextHead().eval()
    forward = model.forward
    model.forward = lambda b: (scored.append(len(b["label"])), forward(b))[1]
    val = validate_batches(
        model, _val_stream(), rank=rank, world=world, device=torch.device("cpu"), autocast=nullcontext,
        objective=FusionObjective(task="single_label", classification=1.0, contrastive=0.0, mlm=0.0, vtm=0.0),
        task="single_label", target_key="label", cache=None,
    )
    return val.scores, val.targets, val.ids, val.loss, scored


def _val_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import pickle
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(_run_validate(rank, world)))
    finally:
        dist.destroy_process_group()


def test_every_rank_validates_its_share_and_all_get_the_full_result(tmp_path) -> None:
    """2 gloo ranks: each scores about half the val batches; both end with exactly the single-worker result."""
    import pickle

    import numpy as np
    import torch.multiprocessing as mp
    from test_losses import _free_port

    mp.spawn(_val_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _run_validate(0, 1)
    assert single[4] == [4, 4, 4, 4, 2]
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert [r[4] for r in ranks] == [[4, 4, 2], [4, 4]]  # batches 0, 2, 4 and 1, 3
    for got in ranks:
        for a, b in zip(got[:3], single[:3], strict=True):
            np.testing.assert_array_equal(a, b)
        assert got[3] == single[3]  # val loss summed in stream order: identical, not just close
