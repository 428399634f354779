"""Losses against direct reference computations, plus a real 2-process gloo run of the gathered losses."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raypipe.config import LossConfig
from raypipe.losses import (
    IGNORE_INDEX,
    MAX_LOGIT_SCALE,
    MIN_LOGIT_SCALE,
    ClassificationLoss,
    FusionObjective,
    InfoNCELoss,
    MILNCELoss,
    MLMLoss,
    VTMLoss,
    gather_with_grad,
    mask_tokens,
    sample_hard_negatives,
    vtm_targets,
)

# --------------------------------------------------------------------------------------------- references


def reference_milnce(video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The public reference ``MILNCELoss.forward`` verbatim (minus ``.cuda()``)."""
    x = torch.matmul(video, text.t())
    x = x.view(video.shape[0], video.shape[0], -1)
    nominator = x * torch.eye(x.shape[0])[:, :, None]
    nominator = nominator.sum(dim=1)
    nominator = torch.logsumexp(nominator, dim=1)
    denominator = torch.cat((x, x.permute(1, 0, 2)), dim=1).view(x.shape[0], -1)
    denominator = torch.logsumexp(denominator, dim=1)
    return torch.mean(denominator - nominator)


def naive_milnce(video: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Per-clip loop in float64 python maths: -log(sum_k e^{x_iik} / (sum_jk e^{x_ijk} + sum_jk e^{x_jik}))."""
    v = F.normalize(video.double(), dim=-1)
    t = F.normalize(text.double(), dim=-1)
    b = v.shape[0]
    k = t.shape[0] // b
    total = 0.0
    for i in range(b):

        def sim(a: int, c: int, kk: int) -> float:
            return scale * float(v[a] @ t[c * k + kk])

        pos = sum(math.exp(sim(i, i, kk)) for kk in range(k))
        den = sum(math.exp(sim(i, j, kk)) for j in range(b) for kk in range(k))
        den += sum(math.exp(sim(j, i, kk)) for j in range(b) for kk in range(k))
        total += -math.log(pos / den)
    return total / b


def naive_symmetric_nce(video: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """The MIL-NCE paper's NCE with K=1: one softmax over the clip's texts and the text's clips."""
    v = F.normalize(video.double(), dim=-1)
    t = F.normalize(text.double(), dim=-1)
    s = scale * v @ t.T
    b = s.shape[0]
    return sum(-math.log(math.exp(s[i, i]) / (s[i].exp().sum() + s[:, i].exp().sum())) for i in range(b)) / b


def naive_infonce(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    s = scale * a @ b.T
    n = s.shape[0]
    a2b = sum(-math.log(math.exp(s[i, i]) / s[i].exp().sum()) for i in range(n)) / n
    b2a = sum(-math.log(math.exp(s[i, i]) / s[:, i].exp().sum()) for i in range(n)) / n
    return 0.5 * (a2b + b2a)


# -------------------------------------------------------------------------------------------------- MIL-NCE


@pytest.mark.parametrize("k", [1, 3, 5])
def test_milnce_matches_naive_loop(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    video, text = torch.randn(6, 16, generator=g), torch.randn(6 * k, 16, generator=g)
    loss = MILNCELoss(gather=False)(video, text, torch.tensor(10.0))
    assert loss.item() == pytest.approx(naive_milnce(video, text, 10.0), rel=1e-5)


def test_milnce_reference_exact_without_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(5, 8, generator=g), torch.randn(5 * 4, 8, generator=g)
    ours = MILNCELoss(gather=False, normalize=False)(video, text, None)
    torch.testing.assert_close(ours, reference_milnce(video, text))


def test_milnce_k1_is_symmetric_nce() -> None:
    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    loss = MILNCELoss(gather=False)(video, text, 14.0)
    assert loss.item() == pytest.approx(naive_symmetric_nce(video, text, 14.0), rel=1e-5)
    # Not the CLIP average of two cross-entropies: the denominators are pooled (documented difference).
    assert loss.item() != pytest.approx(naive_infonce(video, text, 14.0), rel=1e-3)


def test_infonce_matches_naive_two_way_cross_entropy() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, 10, generator=g), torch.randn(9, 10, generator=g)
    loss = InfoNCELoss(gather=False)(a, b, torch.tensor(20.0))
    assert loss.item() == pytest.approx(naive_infonce(a, b, 20.0), rel=1e-5)


def test_logit_scale_is_clamped_to_albef_temperature_range() -> None:
    g = torch.Generator().manual_seed(3)
    video, text = torch.randn(4, 8, generator=g), torch.randn(8, 8, generator=g)
    loss = MILNCELoss(gather=False)
    assert loss(video, text, 5000.0).item() == pytest.approx(loss(video, text, MAX_LOGIT_SCALE).item())
    assert loss(video, text, 0.5).item() == pytest.approx(loss(video, text, MIN_LOGIT_SCALE).item())
    assert loss(video, text, 0.5).item() != pytest.approx(loss(video, text, 50.0).item())
    inside = torch.tensor(10.0, requires_grad=True)
    loss(video, text, inside).backward()
    assert inside.grad is not None and inside.grad.abs() > 0


@pytest.mark.parametrize("loss_cls", [MILNCELoss, InfoNCELoss])
def test_gradients_flow_to_embeddings_and_scale(loss_cls: type) -> None:
    g = torch.Generator().manual_seed(4)
    video = torch.randn(6, 8, generator=g, requires_grad=True)
    text = torch.randn(6, 8, generator=g, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)  # the model-owned parameter
    loss = loss_cls(gather=False)(video, text, log_scale.exp())
    loss.backward()
    for t in (video, text, log_scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # A step along -grad lowers the loss (the gradient is the real one, not just non-zero).
    with torch.no_grad():
        v2, t2 = video - 0.1 * video.grad, text - 0.1 * text.grad
    assert loss_cls(gather=False)(v2, t2, log_scale.exp()).item() < loss.item()


def test_milnce_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple K"):
        MILNCELoss(gather=False)(torch.randn(4, 8), torch.randn(6, 8), 10.0)
    with pytest.raises(ValueError, match="video"):
        MILNCELoss(gather=False)(torch.randn(4, 8), torch.randn(8, 7), 10.0)


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# ----------------------------------------------------------------------------------------------------- MLM


def _token_batch(b: int = 256, length: int = 64, vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(10, vocab, (b, length), generator=g)
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    attn = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(b), lengths - 1] = 102  # [SEP]
    ids[attn == 0] = 0  # [PAD]
    return ids, attn


SPECIAL = [0, 100, 101, 102, 103]


def _within_5_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def test_mask_tokens_proportions_are_bert_15_80_10_10() -> None:
    vocab = 1000
    ids, attn = _token_batch(vocab=vocab)
    masked, labels = mask_tokens(
        ids,
        attn,
        mask_token_id=103,
        vocab_size=vocab,
        special_token_ids=SPECIAL,
        generator=torch.Generator().manual_seed(0),
    )
    candidates = attn.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != IGNORE_INDEX
    n_cand, n_sel = int(candidates.sum()), int(selected.sum())
    assert n_cand > 5000
    assert _within_5_sigma(n_sel, n_cand, 0.15)
    to_mask = int((masked[selected] == 103).sum())
    unchanged = int((masked[selected] == ids[selected]).sum())
    other = n_sel - to_mask - unchanged
    # A random replacement can hit [MASK] or the original id with probability 1/vocab each.
    assert _within_5_sigma(to_mask, n_sel, 0.8 + 0.1 / vocab)
    assert _within_5_sigma(unchanged, n_sel, 0.1 + 0.1 / vocab)
    assert _within_5_sigma(other, n_sel, 0.1 * (1 - 2 / vocab))
    torch.testing.assert_close(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # nothing outside the selection changes


def test_mask_tokens_never_touches_special_or_padding() -> None:
    ids, attn = _token_batch()
    protected = (attn == 0) | torch.isin(ids, torch.tensor(SPECIAL))
    for seed in range(5):
        masked, labels = mask_tokens(
            ids,
            attn,
            mask_token_id=103,
            vocab_size=1000,
            special_token_ids=SPECIAL,
            mlm_probability=0.9,
            generator=torch.Generator().manual_seed(seed),
        )
        assert (labels[protected] == IGNORE_INDEX).all()
        assert torch.equal(masked[protected], ids[protected])


def test_mask_tokens_is_reproducible_and_leaves_input_alone() -> None:
    ids, attn = _token_batch(b=8)
    before = ids.clone()
    kw = dict(mask_token_id=103, vocab_size=1000, special_token_ids=SPECIAL)
    a = mask_tokens(ids, attn, **kw, generator=torch.Generator().manual_seed(9))
    b = mask_tokens(ids, attn, **kw, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(ids, before)
    none, labels = mask_tokens(ids, attn, **kw, mlm_probability=0.0)
    assert torch.equal(none, ids) and (labels == IGNORE_INDEX).all()
    _, labels = mask_tokens(ids, attn, **kw, mlm_probability=1.0)
    candidates = attn.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(labels != IGNORE_INDEX, candidates)


def test_mlm_loss_is_cross_entropy_over_selected_positions() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[0, 2], labels[1, 5], labels[2, 0] = 4, 9, 1
    expected = (
        -(logits[0, 2].log_softmax(-1)[4] + logits[1, 5].log_softmax(-1)[9] + logits[2, 0].log_softmax(-1)[1]) / 3
    )
    torch.testing.assert_close(MLMLoss()(logits, labels), expected)
    empty = MLMLoss()(logits, torch.full((3, 7), IGNORE_INDEX))
    assert empty.item() == 0.0 and empty.requires_grad  # no NaN, still part of the graph


# ----------------------------------------------------------------------------------------------------- VTM


def test_hard_negatives_are_never_the_positive() -> None:
    g = torch.Generator().manual_seed(7)
    sim = torch.randn(6, 6, generator=g) * 3
    sim.fill_diagonal_(50.0)  # the positive is by far the most similar: it must still never be drawn
    draws = torch.stack([sample_hard_negatives(sim, g) for _ in range(2000)])  # (2000, 6)
    assert (draws != torch.arange(6)).all()
    assert set(draws[:, 0].tolist()) == {1, 2, 3, 4, 5}  # every other candidate stays drawable


def test_hard_negatives_follow_softmax_weights() -> None:
    g = torch.Generator().manual_seed(8)
    sim = torch.randn(5, 5, generator=g)
    n = 20000
    draws = torch.stack([sample_hard_negatives(sim, g) for _ in range(n)])  # (n, 5)
    weights = sim.softmax(dim=1) + 1e-5
    weights.fill_diagonal_(0)
    probs = weights / weights.sum(dim=1, keepdim=True)
    for row in range(5):
        for col in range(5):
            count = int((draws[:, row] == col).sum())
            p = float(probs[row, col])
            if p == 0:
                assert count == 0
            else:
                assert _within_5_sigma(count, n, p), (row, col, count, n * p)


def test_hard_negatives_reject_single_row() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_vtm_loss_and_targets() -> None:
    logits = torch.randn(12, 2)
    labels = vtm_targets(4)
    assert labels.tolist() == [1] * 4 + [0] * 8
    torch.testing.assert_close(VTMLoss()(logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="3B"):
        VTMLoss()(torch.randn(12, 3), labels)


# ------------------------------------------------------------------------------------------ classification


def test_classification_single_and_multi_label() -> None:
    logits = torch.randn(4, 5)
    y = torch.tensor([0, 3, 2, 4])
    torch.testing.assert_close(ClassificationLoss("single_label")(logits, y), F.cross_entropy(logits, y))
    multi = (torch.rand(4, 5) > 0.5).float()
    manual = -(multi * F.logsigmoid(logits) + (1 - multi) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(ClassificationLoss("multi_label")(logits, multi), manual)
    with pytest.raises(ValueError, match="multi-hot"):
        ClassificationLoss("multi_label")(logits, y)
    with pytest.raises(ValueError, match="task"):
        ClassificationLoss("regression")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- objective


def _outputs(b: int = 4, k: int = 2, c: int = 5, length: int = 6, vocab: int = 13) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    mlm_labels = torch.full((b, length), IGNORE_INDEX)
    mlm_labels[:, 1] = 3
    return {
        "logits": torch.randn(b, c, generator=g, requires_grad=True),
        "con_video": torch.randn(b, 8, generator=g, requires_grad=True),
        "con_text": torch.randn(b * k, 8, generator=g, requires_grad=True),
        "logit_scale": torch.tensor(1 / 0.07),
        "mlm_logits": torch.randn(b, length, vocab, generator=g, requires_grad=True),
        "mlm_labels": mlm_labels,
        "vtm_logits": torch.randn(3 * b, 2, generator=g, requires_grad=True),
        "vtm_labels": vtm_targets(b),
    }


def test_fusion_objective_combines_weighted_terms() -> None:
    out = _outputs()
    batch = {"label": torch.tensor([0, 1, 2, 3])}
    objective = FusionObjective.from_config(LossConfig(), "single_label", gather=False)
    total, terms = objective(out, batch)
    expected = {
        "classification": F.cross_entropy(out["logits"], batch["label"]),
        "contrastive": MILNCELoss(gather=False)(out["con_video"], out["con_text"], out["logit_scale"]),
        "mlm": MLMLoss()(out["mlm_logits"], out["mlm_labels"]),
        "vtm": VTMLoss()(out["vtm_logits"], out["vtm_labels"]),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach())
    torch.testing.assert_close(
        total, expected["classification"] + expected["contrastive"] + 0.25 * expected["mlm"] + 0.25 * expected["vtm"]
    )
    total.backward()
    assert all(out[key].grad is not None for key in ("logits", "con_video", "con_text", "mlm_logits", "vtm_logits"))


def test_fusion_objective_zero_weight_switches_a_term_off() -> None:
    out = _outputs()
    out["mlm_logits"] = torch.full_like(out["mlm_logits"], float("nan"))  # present but ignored at weight 0
    objective = FusionObjective(classification=1, contrastive=0, mlm=0, vtm=0.5, gather=False)
    total, terms = objective(out, {"label": torch.tensor([0, 1, 2, 3])})
    assert set(terms) == {"classification", "vtm"}
    torch.testing.assert_close(total, terms["classification"] + 0.5 * terms["vtm"])
    assert torch.isfinite(total)


def test_unimodal_term_is_the_mean_of_each_stream_heads_cross_entropy() -> None:
    g = torch.Generator().manual_seed(3)
    out = {"logits": torch.randn(4, 5, generator=g), "uni_logits": torch.randn(4, 2, 5, generator=g, requires_grad=True)}
    label = torch.tensor([0, 1, 2, 3])
    objective = FusionObjective(contrastive=0, mlm=0, vtm=0, unimodal=0.5, gather=False)
    total, terms = objective(out, {"label": label})
    expected = (F.cross_entropy(out["uni_logits"][:, 0], label) + F.cross_entropy(out["uni_logits"][:, 1], label)) / 2
    torch.testing.assert_close(terms["unimodal"], expected)
    torch.testing.assert_close(total, terms["classification"] + 0.5 * expected)
    total.backward()
    assert bool(out["uni_logits"].grad[:, 0].abs().sum() > 0) and bool(out["uni_logits"].grad[:, 1].abs().sum() > 0)
    del out["uni_logits"]
    with pytest.raises(ValueError, match=r"'unimodal'.*uni_logits.*train\.loss\.unimodal=0"):
        objective(out, {"label": label})


def test_fusion_objective_missing_outputs_raise_clearly() -> None:
    out = _outputs()
    del out["vtm_logits"]
    with pytest.raises(ValueError, match=r"'vtm'.*vtm_logits.*train\.loss\.vtm=0"):
        FusionObjective(gather=False)(out, {"label": torch.tensor([0, 1, 2, 3])})
    with pytest.raises(ValueError, match="batch\\['label'\\]"):
        FusionObjective(contrastive=0, mlm=0, vtm=0, gather=False)(_outputs(), {})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        FusionObjective(classification=0, contrastive=0, mlm=0, vtm=0)(_outputs(), {})
    with pytest.raises(ValueError, match="train.loss.mlm"):
        FusionObjective(mlm=-1)


def test_fusion_objective_multi_label_and_infonce() -> None:
    out = _outputs(k=1)
    labels = (torch.rand(4, 5) > 0.5).float()
    objective = FusionObjective(task="multi_label", mlm=0, vtm=0, contrastive_loss="infonce", gather=False)
    total, terms = objective(out, {"labels": labels})
    torch.testing.assert_close(terms["classification"], F.binary_cross_entropy_with_logits(out["logits"], labels))
    torch.testing.assert_close(
        terms["contrastive"], InfoNCELoss(gather=False)(out["con_video"], out["con_text"], out["logit_scale"])
    )


# ------------------------------------------------------------------------------- real 2-process gloo DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_problem(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear, torch.nn.Linear]:
    g = torch.Generator().manual_seed(123)
    video_in = torch.randn(7, 6, generator=g)
    text_in = torch.randn(7 * k, 6, generator=g)
    torch.manual_seed(0)
    return video_in, text_in, torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)


def _dist_worker(rank: int, world: int, port: int, out_dir: str, k: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        video_in, text_in, proj_v, proj_t = _full_problem(k)
        # Uneven shards (4 + 3 clips) exercise the padding path of the gather.
        bounds = [(0, 4), (4, 7)][rank]
        video_local = video_in[bounds[0] : bounds[1]]
        text_local = text_in[bounds[0] * k : bounds[1] * k]
        results = {}
        for name, loss_fn in (("milnce", MILNCELoss()), ("infonce", InfoNCELoss())):
            if name == "infonce" and k != 1:
                continue
            proj_v.zero_grad()
            proj_t.zero_grad()
            log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
            loss = loss_fn(proj_v(video_local), proj_t(text_local), log_scale.exp())
            loss.backward()
            grads = [p.grad.clone() for p in (*proj_v.parameters(), *proj_t.parameters())] + [log_scale.grad.clone()]
            for grad in grads:  # what DDP does with parameter gradients: average over ranks
                dist.all_reduce(grad)
                grad /= world
            results[name] = {"loss": loss.detach(), "grads": grads}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("k", [1, 3])
def test_gathered_losses_equal_single_process_full_batch(tmp_path: Path, k: int) -> None:
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path), k), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    video_in, text_in, proj_v, proj_t = _full_problem(k)
    for name, loss_fn in (("milnce", MILNCELoss()), ("infonce", InfoNCELoss())):
        if name == "infonce" and k != 1:
            continue
        proj_v.zero_grad()
        proj_t.zero_grad()
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        loss = loss_fn(proj_v(video_in), proj_t(text_in), log_scale.exp())
        loss.backward()
        grads = [p.grad for p in (*proj_v.parameters(), *proj_t.parameters())] + [log_scale.grad]
        for rank in ranks:
            torch.testing.assert_close(rank[name]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
            for got, want in zip(rank[name]["grads"], grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
