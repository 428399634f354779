"""train.optim.schedule: the LR curve each schedule gives over epochs x steps per epoch, and stray options."""

from __future__ import annotations

import math

import pytest

from raypipe.config import ConfigError, load_config


def _curve(overrides: list[str], *, steps_per_epoch: int, epochs: int) -> list[float]:
    """The main group's LR at every optimizer step of a run, through torch's real LambdaLR + AdamW."""
    import torch

    from raypipe.train_worker import lr_schedule

    optim = load_config("test", overrides).train.optim
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(optim, steps_per_epoch=steps_per_epoch, epochs=epochs))
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_is_the_default_warm_up_then_decay_to_zero() -> None:
    lrs = _curve(["train.optim.lr=1.0", "train.optim.warmup_steps=4"], steps_per_epoch=5, epochs=4)
    assert load_config("test").train.optim.schedule == "cosine"
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_step_decays_by_gamma_every_n_epochs_up_to_max_decays() -> None:
    # BiLSTM's paper schedule (decay x0.2 at epochs 5, 10, 15, 20 of 30), shrunk to 3 steps per epoch.
    sets = ["train.optim.lr=1.0", "train.optim.warmup_steps=0", "train.optim.schedule=step",
            "train.optim.step_epochs=5", "train.optim.gamma=0.2", "train.optim.max_decays=4"]
    lrs = _curve(sets, steps_per_epoch=3, epochs=30)
    per_epoch = [lrs[e * 3] for e in range(30)]
    assert all(lrs[e * 3] == lrs[e * 3 + 2] for e in range(30))  # constant within an epoch
    expected = [0.2 ** min(e // 5, 4) for e in range(30)]
    assert per_epoch == pytest.approx(expected)
    assert per_epoch[4] == 1.0 and per_epoch[5] == pytest.approx(0.2) and per_epoch[29] == pytest.approx(0.2**4)
    unlimited = _curve(sets[:-1], steps_per_epoch=3, epochs=30)
    assert unlimited[25 * 3] == pytest.approx(0.2**5)


def test_constant_stays_at_lr_after_warm_up() -> None:
    lrs = _curve(["train.optim.lr=0.5", "train.optim.warmup_steps=2", "train.optim.schedule=constant"],
                 steps_per_epoch=4, epochs=3)
    assert lrs[:2] == pytest.approx([0.25, 0.5]) and lrs[2:] == pytest.approx([0.5] * 10)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.optim.gamma=0.5"], "option(s) ['gamma'] are not used by schedule='cosine'; it reads none"),
        (["train.optim.schedule=constant", "train.optim.step_epochs=3"], "['step_epochs'] are not used by schedule='constant'"),
        (["train.optim.schedule=linear"], "train.optim.schedule: Input should be 'cosine', 'step' or 'constant'"),
        (["train.optim.schedule=step", "train.optim.gamma=0"], "train.optim.gamma: Input should be greater than 0"),
    ],
)
def test_options_of_another_schedule_are_rejected(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("test", overrides)
    assert expected in str(info.value) and len(str(info.value).splitlines()) == 1
