"""WBDC (annotations + zip of {id}.npy) and YouTube-8M (TFRecord SequenceExample) importers, on files written
here in the real formats; TFRecord framing/CRC and protobuf round trip without TensorFlow."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from raypipe.config import load_config
from raypipe.embed.importers import dequantize, import_features, uniform_indices
from raypipe.io.shards import read_errors, read_shards
from raypipe.io.tfrecord import (
    crc32c,
    decode_sequence_example,
    encode_sequence_example,
    read_records,
    write_records,
)


def test_crc32c_known_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_sequence_example_round_trip_and_crc_check(tmp_path: Path) -> None:
    rec = encode_sequence_example({"id": b"abc", "labels": [3, 700, 2**40]}, {"rgb": [b"\x01\x02", b"\x03\x04"]})
    buf = io.BytesIO()
    write_records(buf, [rec, rec])
    raw = buf.getvalue()
    got = list(read_records(io.BytesIO(raw)))
    assert len(got) == 2
    ctx, lists = decode_sequence_example(got[0])
    assert ctx == {"id": [b"abc"], "labels": [3, 700, 2**40]} and lists == {"rgb": [[b"\x01\x02"], [b"\x03\x04"]]}
    broken = bytearray(raw)
    broken[20] ^= 0xFF
    with pytest.raises(ValueError, match="CRC"):
        list(read_records(io.BytesIO(bytes(broken))))


def _cfg(tmp_path: Path, uri: str, annotations: str | None):
    return load_config("test", [
        f"embed.source.uri={uri}", f"embed.source.annotations={annotations or 'null'}",
        f"embed.output={tmp_path / 'out'}", "embed.text.model=tiny-random", "embed.num_shards=2",
    ])


def test_wbdc_import(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    anns = [
        {"id": f"w{i}", "title": f"title {i} !!!", "asr": "asr words", "ocr": [{"time": 1, "text": "ocr"}],
         "category_id": 1203 + i}
        for i in range(5)
    ]
    feats = {f"w{i}": rng.normal(size=(5 + 10 * i, 768)).astype(np.float16) for i in range(4)}  # w4 missing
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    with zipfile.ZipFile(tmp_path / "feats.zip", "w") as zf:
        for vid, arr in feats.items():
            b = io.BytesIO()
            np.save(b, arr)
            zf.writestr(f"zip_feats/{vid}.npy", b.getvalue())
    cfg = _cfg(tmp_path, str(tmp_path / "feats.zip"), str(tmp_path / "ann.json"))
    cfg.embed.source.kind = "wbdc_features"
    summary = import_features(cfg)
    assert summary["videos_ok"] == 4 and summary["failed_by_reason"] == {"missing_features": 1}
    table, info = read_shards(cfg.embed.output)
    assert info.frame_dim == 768 and info.audio_dim == 0 and info.tokenizer["vocab_size"] == 30522
    rows = {r["video_id"]: r for r in table.to_pylist()}
    for vid, arr in feats.items():
        r = rows[vid]
        n = min(32, len(arr))
        assert r["num_frames"] == n and sum(r["frame_mask"]) == n
        emb = np.array(r["frame_emb"], np.float16).reshape(32, 768)
        np.testing.assert_array_equal(emb[:n], arr[:n])
        assert not any(r["audio_mask"])
        assert r["label"] == anns[int(vid[1:])]["category_id"].__str__() and r["label_l1"] == "12"
        assert r["text"] == f"title {vid[1:]} ! asr words ocr"
    assert read_errors(cfg.embed.output).column("video_id").to_pylist() == ["w4"]
    assert import_features(cfg)["videos_processed"] == 0  # rerun skips imported ids


def test_uniform_indices_keep_all_or_spread_over_the_whole_video() -> None:
    assert uniform_indices(5, 300).tolist() == [0, 1, 2, 3, 4]
    assert uniform_indices(300, 300).tolist() == list(range(300))
    assert uniform_indices(10, 4).tolist() == [0, 2, 5, 7]
    idx = uniform_indices(1000, 300)
    assert len(idx) == 300 and idx[0] == 0 and idx[-1] == 996 and np.all(np.diff(idx) >= 3)


@pytest.mark.parametrize("max_frames", [32, 300])
def test_yt8m_import(tmp_path: Path, max_frames: int) -> None:
    rng = np.random.default_rng(1)
    records, truth = [], {}
    for i in range(3):
        n = [5, 40, 1][i] if max_frames == 32 else [5, 450, 300][i]
        rgb = rng.integers(0, 256, size=(n, 1024), dtype=np.uint8)
        aud = rng.integers(0, 256, size=(n, 128), dtype=np.uint8)
        labels = [i, 100 + i]
        truth[f"yt{i}"] = (rgb, aud, labels)
        records.append(encode_sequence_example(
            {"id": f"yt{i}".encode(), "labels": labels},
            {"rgb": [r.tobytes() for r in rgb], "audio": [a.tobytes() for a in aud]},
        ))
    with open(tmp_path / "train0.tfrecord", "wb") as f:
        write_records(f, records)
    cfg = _cfg(tmp_path, str(tmp_path / "*.tfrecord"), None)
    cfg.embed.source.kind = "yt8m"
    cfg.embed.decode.max_frames = max_frames
    summary = import_features(cfg)
    assert summary["videos_ok"] == 3
    table, info = read_shards(cfg.embed.output)
    assert (info.frame_dim, info.audio_dim, info.max_frames) == (1024, 128, max_frames)
    rows = {r["video_id"]: r for r in table.to_pylist()}
    t = max_frames
    for vid, (rgb, aud, labels) in truth.items():
        r = rows[vid]
        keep = uniform_indices(len(rgb), t)  # longer than t seconds: spread over the whole record, not its head
        n = len(keep)
        assert n == min(t, len(rgb)) and (len(rgb) <= t or keep[-1] > t)
        assert r["num_frames"] == n and r["labels"] == [str(x) for x in labels] and r["label"] is None
        assert r["frame_times"][:n] == keep.tolist() and r["duration_s"] == len(rgb)
        emb = np.array(r["frame_emb"], np.float32).reshape(t, 1024)
        np.testing.assert_allclose(emb[:n], dequantize(rgb[keep]), atol=2e-3)
        assert emb[:n].min() >= -2 and emb[:n].max() <= 2 + 4 / 510  # bins are centred: top bin 2 + half a bin
        a = np.array(r["audio_emb"], np.float32).reshape(t, 128)
        np.testing.assert_allclose(a[:n], dequantize(aud[keep]), atol=2e-3)
        assert sum(r["audio_mask"]) == n
