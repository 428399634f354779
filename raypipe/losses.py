"""Training objectives of the fusion models (pure PyTorch; nothing here imports Ray).

The losses follow the reference semantics in the project's reference sheet (section 2):

* :class:`MILNCELoss` is the MIL-NCE of Miech et al. (reference ``MILNCELoss``) with the DMAFNet paper's
  learnable temperature added: embeddings are L2-normalised and multiplied by a clamped logit scale.
* :class:`InfoNCELoss` is the CLIP-style symmetric InfoNCE (mean of the two cross-entropies) used by CAV-Net's
  language-guided contrastive learning.
* :func:`mask_tokens` / :class:`MLMLoss` implement BERT masking (15 %, then 80/10/10) with labels ``-100``.
* :func:`sample_hard_negatives` / :class:`VTMLoss` implement ALBEF's in-batch hard-negative matching.
* :class:`FusionObjective` combines them with the weights of :class:`raypipe.config.LossConfig`.

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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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
        raise ValueError("hard-negative sampling needs a batch of at least 2 (a row has no negative otherwise)")
    with torch.no_grad():
        weights = F.softmax(sim.detach().float(), dim=1) + 1e-5  # (B, B)
        weights = torch.nan_to_num(weights, nan=1e-5)
        weights.fill_diagonal_(0.0)
        if generator is not None and generator.device != weights.device:
            return torch.multinomial(weights.to(generator.device), 1, generator=generator).squeeze(1).to(sim.device)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)
