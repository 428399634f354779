"""embed.decode.max_frames up to 300: accepted up to 300, the decode memory the planner asks, the models sized
from the shards' max_frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_decode import make_video  # noqa: E402 - the helper that writes real H.264 files

from raypipe.config import ConfigError, load_config
from raypipe.resources import Cluster, NodeType, decode_bytes_per_video, plan_embed


def test_max_frames_accepts_300_and_rejects_more() -> None:
    assert load_config("test", ["embed.decode.max_frames=300"]).embed.decode.max_frames == 300
    with pytest.raises(ConfigError, match="embed.decode.max_frames: Input should be less than or equal to 300"):
        load_config("test", ["embed.decode.max_frames=301"])


def test_decode_memory_is_sized_by_frames() -> None:
    node = Cluster((NodeType({"CPU": 16, "memory": 64e9}),))
    e = load_config(None, ["embed.decode.max_frames=300"]).embed
    # 300 x (112 x 112 x 3 uint8 + 16000 x 4 float32 audio) = 30.5 MB per video, the figure the docs state;
    # 2 videos per block, held twice, + 64 MB = 186 MB: under the default 256 MB ask, which stays
    assert decode_bytes_per_video(e) == 300 * (112 * 112 * 3 + 16000 * 4) == 30_489_600
    plan = plan_embed(e, node)
    assert plan.settings["embed.decode_memory"] == 256 * 2**20 and not any("decode_memory_mb" in r for r in plan.rules)
    big = load_config(None, ["embed.decode.max_frames=300", "embed.frames.image_size=224"]).embed
    assert decode_bytes_per_video(big) == 64_358_400  # 64.4 MB per video at 224 px
    plan = plan_embed(big, node)
    assert plan.settings["embed.decode_memory"] == 2 * 2 * 64_358_400 + 64 * 2**20  # 324.5 MB > 256 MB
    assert any("> embed.decode_memory_mb" in r and "2 videos x 300 frames" in r for r in plan.rules)


def test_positional_embeddings_follow_the_shards_max_frames() -> None:
    import torch

    from raypipe.models import create_model
    from raypipe.models.resolve import resolve_kwargs
    from raypipe.schema import ShardInfo

    info = ShardInfo(frame_dim=8, audio_dim=4, text_dim=8, text_len=8, max_frames=300, tokenizer={"vocab_size": 30})
    for name, params in (("dmafnet", {"text_encoder_path": None, "frame_layers": 1, "fusion_layers": 1,
                                      "frame_heads": 2, "fusion_heads": 2, "text_hidden": 8, "text_layers": 1,
                                      "text_heads": 2}), ("cavnet", {})):
        kwargs = resolve_kwargs(name, info=info, num_classes=3, multi_label=False,
                                loss_weights={"classification": 1.0}, params=params)
        model = create_model(name, **kwargs)
        pos = [p for n, p in model.named_parameters() if n.endswith(".pos")]
        assert pos and all(p.shape[1] == 300 for p in pos), name
        b = {"frame_feats": torch.randn(2, 300, 8), "frame_mask": torch.ones(2, 300, dtype=torch.bool),
             "audio_feats": torch.randn(2, 300, 4), "audio_mask": torch.ones(2, 300, dtype=torch.bool),
             "text_emb": torch.randn(2, 8), "input_ids": torch.randint(5, 30, (2, 8)),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        assert model(b)["logits"].shape == (2, 3)


def test_embed_rows_of_a_real_mp4_hold_more_than_32_frames(tmp_path: Path) -> None:
    """The embed stage's row path in process (decode -> fused encoders -> shard table; Ray only moves these rows):
    a 40 s H.264 + AAC file at 1 fps with max_frames=300 gives 40 frames and aligned audio in a 300-frame row."""
    from raypipe.embed.pipeline import FusedEncoder, _decode_row, _ref_item, feature_info
    from raypipe.io.sources import VideoRef
    from raypipe.schema import to_feature_tables

    video = make_video(tmp_path / "long.mp4", duration=40.0, fps=2, size=32)
    cfg = load_config("test", ["embed.decode.max_frames=300", "embed.text.model=tiny-random",
                               "embed.frames.image_size=32"])
    row = _decode_row(_ref_item(VideoRef(video_id="v", source_uri=str(video), title="t")),
                      decode_cfg=cfg.embed.decode, image_size=32, storage=cfg.storage)
    batch = {k: np.stack([v]) if isinstance(v, np.ndarray) else np.array([v]) for k, v in row.items()}
    info = feature_info(cfg)
    table, errors = to_feature_tables(FusedEncoder(cfg.embed, cfg.storage)(batch), info)
    assert errors.num_rows == 0 and table.num_rows == 1 and info.max_frames == 300
    r = table.to_pylist()[0]
    assert r["num_frames"] == 40 and sum(r["frame_mask"]) == 40 and sum(r["audio_mask"]) >= 39
    assert r["frame_times"][:40] == [float(k) for k in range(40)]
    assert len(r["frame_emb"]) == 300 * info.frame_dim and len(r["audio_emb"]) == 300 * info.audio_dim
    emb = np.array(r["frame_emb"], np.float32).reshape(300, info.frame_dim)
    assert np.abs(emb[:40]).sum(axis=1).min() > 0 and not emb[40:].any()
