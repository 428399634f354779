"""Device choice and the encoders' GPU path, checked on CPU (issue 21: what a first GPU run would hit).

CUDA is patched in where the question is "what would this do on a GPU node"; the encoders' cross-video batched
path (the GPU default) is run on CPU and compared with the per-video path that CPU runs use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.config.embed import AudioEncoderConfig, FrameEncoderConfig, TextEncoderConfig
from raypipe.device import pick_device, ray_gpu_ids

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_actor_without_ray_gpu_stays_on_cpu(cuda_present: None) -> None:
    assert pick_device([], assigned=True) == torch.device("cpu")


def test_actor_with_ray_gpu_uses_the_assigned_one(cuda_present: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what Ray sets for an actor given GPU 3
    assert pick_device(["3"], assigned=True) == torch.device("cuda", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # Ray told not to narrow it: the id is the index
    assert pick_device(["2"], assigned=True) == torch.device("cuda", 2)


def test_outside_ray_a_visible_gpu_is_used(cuda_present: None) -> None:
    assert ray_gpu_ids() is None  # no Ray worker here
    assert pick_device() == torch.device("cuda", 0)


def test_no_cuda_means_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert pick_device(["0"], assigned=True) == torch.device("cpu")


def test_encoders_and_label_share_pick_device() -> None:
    """One rule for every GPU consumer: the encoders and the labelling actor call raypipe.device.pick_device."""
    from raypipe.embed import audio, common, frames, text

    assert common.pick_device is pick_device
    for mod in (audio, frames, text):
        assert mod.pick_device is pick_device, mod.__name__
    label_src = (REPO / "raypipe" / "label.py").read_text()
    assert "from raypipe.device import pick_device" in label_src and "ray_gpu_ids" not in label_src


def test_every_torch_load_has_map_location() -> None:
    """A checkpoint saved on cuda:N must load on a CPU driver or another GPU."""
    calls = []
    for path in (REPO / "raypipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", None) == "torch":
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert calls, "the scan found no torch.load at all"
    missing = [(f, line) for f, line, kw in calls if "map_location" not in kw]
    assert not missing, missing


# ------------------------------------------------------------------------------------------- encoders


def _batch(rng: np.random.Generator, b: int = 4, t: int = 5, size: int = 32) -> dict[str, np.ndarray]:
    num = np.array([5, 0, 3, 2])[:b]
    status = np.array(["ok", "ok", "failed", "ok"])[:b]
    audio_mask = np.arange(t)[None, :] < num[:, None]
    return {
        "frames": rng.integers(0, 256, (b, t, size, size, 3), dtype=np.uint8),
        "num_frames": num,
        "audio": rng.normal(size=(b, t, 400)).astype(np.float32),
        "audio_mask": audio_mask,
        "status": status,
        "text": np.array(["a short one", "", "failed row text", "a much longer text about a red ball rolling"]),
    }


def _encoders(batch_videos: bool | None):
    from raypipe.embed.audio import AudioEncoder
    from raypipe.embed.frames import FrameEncoder
    from raypipe.embed.text import TextEncoder

    return (
        FrameEncoder(FrameEncoderConfig(image_size=32), batch_videos=batch_videos),
        AudioEncoder(AudioEncoderConfig(), 16000, batch_videos=batch_videos),
        TextEncoder(TextEncoderConfig(model="tiny-random", max_len=32), batch_videos=batch_videos),
    )


def test_cpu_embeds_video_by_video_and_batched_path_matches() -> None:
    """CPU keeps the exact per-video rows; the GPU default (one pass per Ray batch) gives the same rows to fp16
    rounding, zeros for failed rows and masked frames included."""
    per_video, batched = _encoders(None), _encoders(True)
    assert not any(e.batch_videos for e in per_video)
    outs = []
    for encs in (per_video, batched):
        batch = _batch(np.random.default_rng(0))
        for enc in encs:
            batch = enc(batch)
        outs.append(batch)
    a, b = outs
    for key in ("frame_emb", "audio_emb", "text_emb"):
        assert a[key].shape == b[key].shape
        assert np.abs(a[key]).sum() > 0, key
        np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), atol=2e-3, rtol=2e-3)
        assert not a[key][2].any() and not b[key][2].any(), f"{key}: failed row must stay zero"
    assert not a["frame_emb"][1].any() and not b["frame_emb"][3, 2:].any()  # no frames / masked frames
    np.testing.assert_array_equal(a["frame_mask"], b["frame_mask"])


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for an encoder model: records the device of what it is given, then stops the call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor | None = None, **kw: torch.Tensor) -> torch.Tensor:
        self.seen += [v.device for v in ([x] if x is not None else []) + list(kw.values())]
        raise _Stop


def test_encoders_move_inputs_to_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a non-CPU device (``meta`` stands in for ``cuda``: no GPU here) every input reaches the model there."""
    import raypipe.embed.audio as audio_mod
    import raypipe.embed.frames as frames_mod
    import raypipe.embed.text as text_mod

    meta = torch.device("meta")
    for mod in (audio_mod, frames_mod, text_mod):
        monkeypatch.setattr(mod, "pick_device", lambda: meta)
    for enc in _encoders(None):
        assert enc.device == meta and enc.batch_videos, "an accelerator batches across videos by default"
        enc.model = _Recorder()
        with pytest.raises(_Stop):
            enc(_batch(np.random.default_rng(1)))
        assert enc.model.seen and all(d == meta for d in enc.model.seen), (type(enc).__name__, enc.model.seen)


def test_eval_runs_on_gpu_when_available(cuda_present: None) -> None:
    from raypipe.evaluate import eval_device

    assert eval_device("auto") == torch.device("cuda", 0)  # raypipe eval runs outside Ray: a visible GPU is used
    assert eval_device("cpu") == torch.device("cpu")


def test_eval_device_cuda_without_gpu_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from raypipe.config import ConfigError
    from raypipe.evaluate import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="eval.device"):
        eval_device("cuda")
    assert eval_device("auto") == torch.device("cpu")
