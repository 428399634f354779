"""Production weight loading through the real code path: state dicts and an HF text folder, local and on S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.config.embed import AudioEncoderConfig, FrameEncoderConfig, TextEncoderConfig
from raypipe.embed.audio import AudioEncoder, build_audio_model
from raypipe.embed.frames import FrameEncoder, build_frame_model
from raypipe.embed.text import TextEncoder, load_text_model
from raypipe.io.fs import resolve


def test_frame_and_audio_weights_local_and_s3(tmp_path: Path, moto_s3) -> None:
    from safetensors.torch import save_file

    trained = build_frame_model(FrameEncoderConfig(model="resnet10t", seed=123))  # stands in for trained weights
    (tmp_path / "frames").mkdir()
    save_file(trained.state_dict(), str(tmp_path / "frames" / "model.safetensors"))
    audio = build_audio_model(AudioEncoderConfig(seed=99), 16000)
    torch.save(audio.state_dict(), tmp_path / "audio.pt")
    fs, _ = resolve(f"s3://{moto_s3.bucket}", moto_s3.storage)
    fs.put(str(tmp_path / "frames" / "model.safetensors"), f"{moto_s3.bucket}/weights/frames/model.safetensors")
    fs.put(str(tmp_path / "audio.pt"), f"{moto_s3.bucket}/weights/audio.pt")

    frames = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    random_init = FrameEncoder(FrameEncoderConfig(image_size=32, seed=0)).embed(frames)
    for uri in (str(tmp_path / "frames"), f"s3://{moto_s3.bucket}/weights/frames"):
        enc = FrameEncoder(FrameEncoderConfig(image_size=32, weights=uri, seed=0), moto_s3.storage)
        for k, v in trained.state_dict().items():
            assert torch.equal(enc.model.state_dict()[k], v), k
        out = enc.embed(frames)
        assert not np.array_equal(out, random_init)
    wav = np.random.default_rng(1).normal(size=(2, 16000)).astype(np.float32)
    for uri in (str(tmp_path / "audio.pt"), f"s3://{moto_s3.bucket}/weights/audio.pt"):
        enc = AudioEncoder(AudioEncoderConfig(weights=uri, seed=0), 16000, moto_s3.storage)
        np.testing.assert_array_equal(enc.embed(wav), AudioEncoder(AudioEncoderConfig(seed=99), 16000).embed(wav))
    with pytest.raises(ValueError, match="embed.frames.weights"):
        FrameEncoder(FrameEncoderConfig(model="mobilenetv3_small_050", weights=str(tmp_path / "frames")))


def test_text_model_folder_local_and_s3(tmp_path: Path, moto_s3) -> None:
    tok, model, _ = load_text_model(TextEncoderConfig(model="tiny-random", seed=5))
    folder = tmp_path / "text"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    fs, _ = resolve(f"s3://{moto_s3.bucket}", moto_s3.storage)
    fs.put(str(folder) + "/", f"{moto_s3.bucket}/weights/text/", recursive=True)
    batch = {"text": np.array(["a beach at sunset", "mountain snow"], dtype=object), "status": np.array(["ok", "ok"])}
    expected = TextEncoder(TextEncoderConfig(model="tiny-random", seed=5, max_len=32))(dict(batch))["text_emb"]
    for uri in (str(folder), f"s3://{moto_s3.bucket}/weights/text"):
        out = TextEncoder(TextEncoderConfig(model=uri, max_len=32), moto_s3.storage)(dict(batch))
        np.testing.assert_array_equal(out["text_emb"], expected)
        assert out["input_ids"].shape == (2, 32)
