"""Config loading and validation: every bad config fails up front with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.cli import main
from raypipe.config import ConfigError, RaypipeConfig, load_config, preset_names


def test_presets_load_and_validate() -> None:
    assert {"demo", "test"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), RaypipeConfig)


def test_overrides_are_typed() -> None:
    cfg = load_config("demo", ["train.optim.lr=1e-4", "train.epochs=3", "corpus.bad_inputs=false"])
    assert cfg.train.optim.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 3
    assert cfg.corpus.bad_inputs is False


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lrr=1"], "config error: train.lrr: unknown key (allowed: "),
        (["bogus.key=1"], "config error: bogus: unknown key"),
        (["train.optim.lr=abc"], "config error: train.optim.lr: must be a number > 0 or 'auto'"),
        (["train.optim.lr=0"], "config error: train.optim.lr: must be a number > 0 or 'auto'"),
        (["train.optim.lr=true"], "config error: train.optim.lr: must be a number > 0 or 'auto'"),
        (["train.epochs=0"], "config error: train.epochs: must be a whole number >= 1 or 'auto'"),
        (["train.batch_size=2.5"], "config error: train.batch_size: must be a whole number >= 1 or 'auto'"),
        (["train.early_stopping_patience=-1"], "config error: train.early_stopping_patience: must be a whole number >= 1, null or 'auto'"),
        (["train.amp=fp32"], "config error: train.amp: Input should be 'none', 'bf16' or 'fp16'"),
        (["train.amp=bf16", "train.use_gpu=false"], "train.amp='bf16' needs train.use_gpu=true"),
        (["corpus.min_duration_s=50", "corpus.max_duration_s=10"], "must not exceed max_duration_s"),
        (["train=3"], "config error: train: Input should be a valid dictionary"),
        (["noequals"], "must look like key.path=value"),
    ],
)
def test_bad_config_is_rejected_with_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    message = str(info.value)
    assert expected in message
    assert len(message.splitlines()) == 1


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("demo", ["train.lrr=1", "train.epochs=-1"])
    lines = str(info.value).splitlines()
    assert any("train.lrr" in line for line in lines)
    assert any("train.epochs" in line for line in lines)


def test_yaml_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        load_config("no-such-preset")


def test_yaml_inherits_from_a_base(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("base: demo\ntrain:\n  epochs: 7\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 7
    assert cfg.corpus.videos == load_config("demo").corpus.videos
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)


def test_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "train.optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("config error: train.optim.lrr: unknown key")


def test_demo_stage_defaults_to_the_demo_preset() -> None:
    """`make demo` runs `raypipe demo` with no -c: that must be the demo preset, not production-sized defaults."""
    from raypipe.cli import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["demo"])) == load_config("demo")
    assert config_from_args(parse(["train"])) == load_config(None)
    assert config_from_args(parse(["demo", "-c", "test"])) == load_config("test")
