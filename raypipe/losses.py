"""Training objectives of the fusion models (pure PyTorch; nothing here imports Ray).

The losses follow the reference semantics in the project's reference sheet (section 2):

* :class:`MILNCELoss` is the MIL-NCE of Miech et al. (reference ``MILNCELoss``) with the DMAFNet paper's
  learnable temperature added: embeddings are L2-normalised and multiplied by a clamped logit scale.
* :class:`InfoNCELoss` is the CLIP-style symmetric InfoNCE (mean of the two cross-entropies) used by CAV-Net's
  language-guided contrastive learning.
* :func:`mask_tokens` / :class:`MLMLoss` implement BERT masking (15 %, then 80/10/10) with labels ``-100``.
* :func:`sample_hard_negatives` / :class:`VTMLoss` implement ALBEF's in-batch hard-negative matching.
* :class:`FusionObjective` combines them with the weights of :class:`raypipe.config.LossConfig`; its optional
  ``unimodal`` term is the classification loss of per-stream heads (deep supervision of each input, see
  :class:`raypipe.models.dmafnet.DMAFNet`).

Why the temperature is *not* a parameter of the loss: under DDP only the wrapped model's parameters are
all-reduced, so a parameter living in a loss module would drift apart on every rank (and would also be missed
by the optimizer and the checkpoint unless wired in by hand). As in open_clip, the model owns
``logit_scale`` (a log-space parameter, initialised at ``log(1/0.07)``) and returns ``logit_scale.exp()`` in its
output dict; the losses here receive that multiplicative scale and clamp it.

Why gathering lives in the losses (as in open_clip): contrastive losses get their negatives from the batch, so
under DDP each rank gathers the other ranks' embeddings. :func:`gather_with_grad` keeps the autograd graph for
the local shard and routes the gradient of the remote shards back to their ranks, so the gradient of the
gathered loss on N ranks equals the gradient of the single-process loss over the full batch (after DDP's
gradient averaging, because each rank computes the same full-batch loss value; see :func:`gather_with_grad`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from raypipe.config.train import LossConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# ALBEF clamps its temperature to [0.001, 0.5]; on the scale (1 / tau) that is [2, 1000].
MIN_TEMPERATURE = 0.001
MAX_TEMPERATURE = 0.5
MIN_LOGIT_SCALE = 1.0 / MAX_TEMPERATURE
MAX_LOGIT_SCALE = 1.0 / MIN_TEMPERATURE
DEFAULT_LOGIT_SCALE_INIT = math.log(1.0 / 0.07)


# ---------------------------------------------------------------------------------------------- random helpers


def _uniform(shape: torch.Size | tuple[int, ...], *, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device (torch requires they match), then moved."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking for the MLM auxiliary task -> ``(masked_input_ids, labels)``.

    ``mlm_probability`` of the real (attention 1), non-special tokens are selected; of those 80 % become
    ``mask_token_id``, 10 % a uniformly random token id in ``[0, vocab_size)`` (as BERT and Hugging Face's
    ``DataCollatorForLanguageModeling`` do) and 10 % stay unchanged. ``labels`` holds the original id at selected
    positions and ``-100`` everywhere else, so the cross entropy only scores the selected tokens. Padding and
    special tokens ([CLS], [SEP], [PAD], ...) are never selected because predicting them teaches nothing and
    would leak the sequence layout. The input is not modified.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    device = input_ids.device
    special = torch.as_tensor(list(special_token_ids), dtype=input_ids.dtype, device=device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, L)
    selected = candidates & (_uniform(input_ids.shape, device=device, generator=generator) < mlm_probability)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))  # (B, L)

    action = _uniform(input_ids.shape, device=device, generator=generator)  # (B, L): <0.8 mask, <0.9 random
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    draw_device = generator.device if generator is not None else device
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=draw_device).to(device)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids.to(input_ids.dtype)[to_random]
    return masked, labels


def sample_hard_negatives(sim: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One in-batch hard negative per row, ALBEF style -> ``(B,)`` column indices, never the diagonal.

    ``sim`` is ``(B, B)`` with row ``i`` = query ``i`` against every candidate; harder (more similar) negatives
    are drawn more often: weights = ``softmax(sim) + 1e-5`` with the diagonal zeroed (the ``1e-5`` is ALBEF's, and
    keeps every off-diagonal candidate drawable even when a peaked softmax underflows), then
    ``torch.multinomial``. No gradient flows through the draw.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (B, B) matrix, got {tuple(sim.shape)}")
    if sim.shape[0] < 2:
        raise ValueError(
            "hard-negative sampling needs a batch of at least 2 (a row has no negative otherwise); "
            "drop the last short batch or skip VTM for it"
        )
    with torch.no_grad():
        weights = F.softmax(sim.detach().float(), dim=1) + 1e-5  # (B, B)
        weights = torch.nan_to_num(weights, nan=1e-5)
        weights.fill_diagonal_(0.0)
        if generator is not None and generator.device != weights.device:
            return torch.multinomial(weights.to(generator.device), 1, generator=generator).squeeze(1).to(sim.device)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


def vtm_targets(batch_size: int, *, device: torch.device | str | None = None) -> Tensor:
    """ALBEF's matching labels for ``B`` positive pairs followed by ``2B`` hard negatives -> ``(3B,)`` int64.

    Label 1 = match, 0 = no match; the negatives are one negative text per video then one negative video per
    text (both drawn with :func:`sample_hard_negatives`).
    """
    return torch.cat(
        [
            torch.ones(batch_size, dtype=torch.long, device=device),
            torch.zeros(2 * batch_size, dtype=torch.long, device=device),
        ]
    )


# ------------------------------------------------------------------------------------------- distributed gather


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 that keeps the graph: the backward all-reduces (sums) the gradient of the whole
    gathered tensor and returns this rank's slice.

    Why a sum: every rank computes the same full-batch loss L, so the total objective seen by autograd across
    ranks is N * L and this rank's slice receives N * dL/dx_local. DDP then *averages* parameter gradients over
    the N ranks, which gives exactly dL/dtheta of the single-process full-batch loss (open_clip's
    ``gather_with_grad`` via ``torch.distributed.nn.all_gather`` has the same semantics). Shards may differ in
    length (a short last batch): the sizes are exchanged first and the shards padded to the longest.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        rank = dist.get_rank()
        local_n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(local_n) for _ in range(world)]
        dist.all_gather(sizes, local_n)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        x = x.contiguous()
        if x.shape[0] < longest:
            pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
            padded = torch.cat([x, pad])
        else:
            padded = x
        shards = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(shards, padded)
        ctx.offset = sum(counts[:rank])
        ctx.local_n = counts[rank]
        return torch.cat([shard[:n] for shard, n in zip(shards, counts, strict=True)])  # (sum(counts), ...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.local_n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), differentiable for the local shard.

    A no-op when torch.distributed is not initialised or has a single rank, so the same loss code runs in a
    plain process, in tests and under Ray Train's DDP.
    """
    if not _is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def _scale_value(logit_scale: Tensor | float | None, *, clamp: bool, like: Tensor) -> Tensor:
    """The multiplicative logit scale (1 / tau) as a tensor, clamped to ALBEF's temperature range."""
    if logit_scale is None:
        return like.new_tensor(1.0)
    scale = torch.as_tensor(logit_scale, dtype=like.dtype, device=like.device)
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}")
    scale = scale.reshape(())
    return scale.clamp(MIN_LOGIT_SCALE, MAX_LOGIT_SCALE) if clamp else scale


# ------------------------------------------------------------------------------------------------ contrastive


class MILNCELoss(nn.Module):
    """MIL-NCE between clip embeddings ``(B, D)`` and ``K`` positive text candidates per clip ``(B*K, D)``.

    Exactly the reference ``MILNCELoss``: with ``x = video @ text.T`` viewed as ``(B, B, K)``, the loss is
    ``mean_i[logsumexp(cat(x[i, :, :], x[:, i, :])) - logsumexp(x[i, i, :])]``; the positives appear in both
    halves of the denominator, as in the reference. DMAFNet adds a learnable temperature, so by default both
    sides are L2-normalised and ``x`` is multiplied by ``logit_scale`` (= 1 / tau, owned by the model, see the
    module docstring) clamped to tau in [0.001, 0.5]. With ``K = 1`` this is the symmetric NCE of the MIL-NCE
    paper: one softmax whose negatives are the clip's other texts *and* the text's other clips,
    ``-log(e^{x_ii} / (sum_j e^{x_ij} + sum_j e^{x_ji}))``. ``normalize=False`` with ``logit_scale=None``
    reproduces the reference bit for bit (no temperature, no normalisation).

    Under DDP (``gather=True``) the embeddings of all ranks are gathered with gradients, so every rank's clips
    see the whole global batch as negatives and the loss equals the single-process loss over that batch.
    """

    def __init__(self, *, gather: bool = True, normalize: bool = True, clamp_scale: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.normalize = normalize
        self.clamp_scale = clamp_scale

    def forward(self, video: Tensor, text: Tensor, logit_scale: Tensor | float | None = None) -> Tensor:
        if video.dim() != 2 or text.dim() != 2 or video.shape[1] != text.shape[1]:
            raise ValueError(
                f"MIL-NCE needs video (B, D) and text (B*K, D); got {tuple(video.shape)} and {tuple(text.shape)}"
            )
        if video.shape[0] == 0 or text.shape[0] % video.shape[0] != 0:
            raise ValueError(
                f"MIL-NCE: text rows ({text.shape[0]}) must be a positive multiple K of video rows ({video.shape[0]})"
            )
        k = text.shape[0] // video.shape[0]
        video = video.float()
        text = text.float()
        if self.normalize:
            video = F.normalize(video, dim=-1)
            text = F.normalize(text, dim=-1)
        if self.gather:
            video = gather_with_grad(video)  # (N, D), N = global batch
            text = gather_with_grad(text)  # (N*K, D)
        n = video.shape[0]
        scale = _scale_value(logit_scale, clamp=self.clamp_scale, like=video)
        x = (scale * video @ text.T).view(n, n, k)  # (N, N, K)
        idx = torch.arange(n, device=x.device)
        numerator = torch.logsumexp(x[idx, idx, :], dim=1)  # (N,)
        denominator = torch.logsumexp(torch.cat([x, x.permute(1, 0, 2)], dim=1).reshape(n, -1), dim=1)  # (N,)
        return (denominator - numerator).mean()


class InfoNCELoss(nn.Module):
    """CLIP-style symmetric InfoNCE: ``(CE(s * a @ b.T, i) + CE(s * b @ a.T, i)) / 2`` with ``i`` the diagonal.

    CAV-Net's language-guided contrastive loss between the pooled video representation and the Sentence-BERT
    embedding of its text. Same normalisation, clamped scale and DDP gathering as :class:`MILNCELoss`. Unlike
    MIL-NCE with ``K = 1`` (one softmax over both directions' negatives) this averages two separate softmaxes.
    """

    def __init__(self, *, gather: bool = True, normalize: bool = True, clamp_scale: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.normalize = normalize
        self.clamp_scale = clamp_scale

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor | float | None = None) -> Tensor:
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(
                f"InfoNCE needs two (B, D) tensors of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        a = a.float()
        b = b.float()
        if self.normalize:
            a = F.normalize(a, dim=-1)
            b = F.normalize(b, dim=-1)
        if self.gather:
            a = gather_with_grad(a)  # (N, D)
            b = gather_with_grad(b)  # (N, D)
        scale = _scale_value(logit_scale, clamp=self.clamp_scale, like=a)
        logits = scale * a @ b.T  # (N, N)
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ------------------------------------------------------------------------------------------ MLM, VTM, classify


class MLMLoss(nn.Module):
    """Cross entropy over the positions :func:`mask_tokens` selected (labels ``-100`` elsewhere are ignored).

    A batch in which no token was selected (tiny texts) gives a zero that still depends on the logits, so every
    DDP rank produces gradients for the same parameters instead of a NaN or a hang.
    """

    def forward(self, mlm_logits: Tensor, mlm_labels: Tensor) -> Tensor:
        if mlm_logits.shape[:-1] != mlm_labels.shape:
            raise ValueError(
                f"mlm_logits {tuple(mlm_logits.shape)} must be labels {tuple(mlm_labels.shape)} plus a vocab axis"
            )
        logits = mlm_logits.reshape(-1, mlm_logits.shape[-1]).float()  # (B*L, V)
        labels = mlm_labels.reshape(-1).long()  # (B*L,)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


class VTMLoss(nn.Module):
    """2-way cross entropy of the matching head over ``B`` positives and ``2B`` hard negatives (ALBEF ITM)."""

    def forward(self, vtm_logits: Tensor, vtm_labels: Tensor) -> Tensor:
        if vtm_logits.dim() != 2 or vtm_logits.shape[1] != 2 or vtm_labels.shape != vtm_logits.shape[:1]:
            raise ValueError(
                f"VTM needs logits (3B, 2) and labels (3B,); got {tuple(vtm_logits.shape)} and {tuple(vtm_labels.shape)}"
            )
        return F.cross_entropy(vtm_logits.float(), vtm_labels.long())


Task = Literal["single_label", "multi_label"]


class ClassificationLoss(nn.Module):
    """Cross entropy on class indices (single label) or BCE-with-logits on multi-hot targets (multi label)."""

    def __init__(self, task: Task = "single_label") -> None:
        super().__init__()
        if task not in ("single_label", "multi_label"):
            raise ValueError(f"task must be 'single_label' or 'multi_label', got {task!r}")
        self.task = task

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.task == "single_label":
            if target.dim() != 1 or target.shape[0] != logits.shape[0]:
                raise ValueError(f"single-label targets must be (B,) class indices; got {tuple(target.shape)}")
            return F.cross_entropy(logits.float(), target.long())
        if target.shape != logits.shape:
            raise ValueError(
                f"multi-label targets must be multi-hot like logits {tuple(logits.shape)}; got {tuple(target.shape)}"
            )
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


# ------------------------------------------------------------------------------------------------ the objective

TERMS = ("classification", "contrastive", "mlm", "vtm", "unimodal")
_REQUIRED_OUTPUTS: dict[str, tuple[str, ...]] = {
    "classification": ("logits",),
    "unimodal": ("uni_logits",),
    "contrastive": ("con_video", "con_text", "logit_scale"),
    "mlm": ("mlm_logits", "mlm_labels"),
    "vtm": ("vtm_logits", "vtm_labels"),
}


class FusionObjective(nn.Module):
    """``L = w_cls l_class + w_con l_con + w_mlm l_mlm + w_vtm l_vtm + w_uni l_uni`` over a model's output dict.

    Paper default (DMAFNet): weights 1, 1, 0.25, 0.25 (and 0 for ``unimodal``, which is not in the paper:
    ``l_uni`` is the mean classification loss of the per-stream heads' ``uni_logits`` ``(B, S, C)``).
    A weight of 0 switches its term off (its outputs, if the model still produces them, are ignored); a positive
    weight whose outputs are missing is a configuration error and raises, naming the missing keys and the config
    key to change. ``forward`` returns the total and the unweighted terms (detached, for logging).
    ``contrastive="infonce"`` selects CAV-Net's symmetric InfoNCE instead of MIL-NCE (which needs ``con_text``
    rows == ``con_video`` rows).
    """

    def __init__(
        self,
        *,
        task: Task = "single_label",
        classification: float = 1.0,
        contrastive: float = 1.0,
        mlm: float = 0.25,
        vtm: float = 0.25,
        unimodal: float = 0.0,
        contrastive_loss: Literal["milnce", "infonce"] = "milnce",
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.weights = {"classification": classification, "contrastive": contrastive, "mlm": mlm, "vtm": vtm,
                        "unimodal": unimodal}
        for name, w in self.weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"train.loss.{name} must be a finite weight >= 0, got {w}")
        if contrastive_loss not in ("milnce", "infonce"):
            raise ValueError(f"contrastive_loss must be 'milnce' or 'infonce', got {contrastive_loss!r}")
        self.task = task
        self.target_key = "label" if task == "single_label" else "labels"
        self.classification = ClassificationLoss(task)
        self.contrastive = MILNCELoss(gather=gather) if contrastive_loss == "milnce" else InfoNCELoss(gather=gather)
        self.mlm = MLMLoss()
        self.vtm = VTMLoss()

    @classmethod
    def from_config(
        cls,
        cfg: LossConfig,
        task: Task,
        *,
        contrastive_loss: Literal["milnce", "infonce"] = "milnce",
        gather: bool = True,
    ) -> FusionObjective:
        return cls(
            task=task,
            classification=cfg.classification,
            contrastive=cfg.contrastive,
            mlm=cfg.mlm,
            vtm=cfg.vtm,
            unimodal=cfg.unimodal,
            contrastive_loss=contrastive_loss,
            gather=gather,
        )

    def active_terms(self) -> list[str]:
        return [name for name in TERMS if self.weights[name] > 0]

    def _require(self, outputs: Mapping[str, Any], name: str) -> None:
        missing = [key for key in _REQUIRED_OUTPUTS[name] if outputs.get(key) is None]
        if missing:
            raise ValueError(
                f"loss term {name!r} has weight {self.weights[name]} but the model output lacks {missing}; "
                f"enable the matching switch in model.params or set train.loss.{name}=0"
            )

    def _unimodal(self, uni_logits: Tensor, target: Tensor) -> Tensor:
        """Mean over the S streams of each stream head's classification loss; ``uni_logits`` is ``(B, S, C)``."""
        if uni_logits.dim() != 3:
            raise ValueError(f"uni_logits must be (B, S, C); got {tuple(uni_logits.shape)}")
        per_stream = [self.classification(uni_logits[:, s], target) for s in range(uni_logits.shape[1])]
        return torch.stack(per_stream).mean()

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name in self.active_terms():
            self._require(outputs, name)
            if name in ("classification", "unimodal") and batch.get(self.target_key) is None:
                raise ValueError(f"task {self.task!r} needs batch[{self.target_key!r}] for the {name} loss")
            if name == "classification":
                value = self.classification(outputs["logits"], batch[self.target_key])
            elif name == "unimodal":
                value = self._unimodal(outputs["uni_logits"], batch[self.target_key])
            elif name == "contrastive":
                value = self.contrastive(outputs["con_video"], outputs["con_text"], outputs["logit_scale"])
            elif name == "mlm":
                value = self.mlm(outputs["mlm_logits"], outputs["mlm_labels"])
            else:
                value = self.vtm(outputs["vtm_logits"], outputs["vtm_labels"])
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
            terms[name] = value.detach()
        if total is None:
            raise ValueError("every loss weight is 0: set at least one of train.loss.{" + ",".join(TERMS) + "} > 0")
        return total, terms
