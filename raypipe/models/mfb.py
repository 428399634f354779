"""MFB video fusion: "Towards Good Practices for Multi-modal Fusion in Large-scale Video Classification"
(Liu, Yuan & Wang, ECCV-W 2018), the YouTube-8M frame-level model.

::

    frame_feats (B,T,Dv) -> aggregation (avgpool | DBoF | NetVLAD | NeXtVLAD, masked) -> l (B,Dl) --\\
    audio_feats (B,T,Da) -> aggregation (own weights)                             -> a (B,Da') ---> fusion -> f
    text_emb    (B,Dt)   -> (used as is, only if "text" is in modalities)                        --/
    f -> classifier (MoE with M experts + dummy slot | linear) -> logits (B,C)

    fusion="mfb":       FC_m -> (B,k*o) each, Hadamard product, dropout 0.1, sum over k, ReLU|power, L2 -> (B,o)
    fusion="concat":    [l, a]                                   (the paper's "Concatenation" baseline)
    fusion="fc_concat": [FC(l), FC(a)] with MFB's FC shapes       ("FC + Concatenation": same fusion params)

Paper settings: k = 5, o = 1000, MFB dropout 0.1, NetVLAD K = 8, DBoF 2000 units, MoE with 2 mixtures,
multi-label sigmoid outputs. The video paper replaces MFB's power normalisation with ReLU, so
``mfb_norm="relu"`` is the default and ``"power"`` gives the original MFB. A silent video (audio mask all
False) aggregates its audio to zeros rather than NaN, so the product still yields a finite vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from raypipe.models.layers import MoE, build_aggregator, build_fusion, check_modalities
from raypipe.models.registry import register_model

MODALITIES = ("frames", "audio", "text")


class MFBNet(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        dims: Mapping[str, int],
        modalities: Sequence[str],
        aggregation: str,
        fusion: str,
        k: int,
        o: int,
        mfb_dropout: float,
        mfb_norm: str,
        classifier: str,
        num_mixtures: int,
        clusters: int,
        dbof_size: int,
        nextvlad_out: int,
        multi_label: bool,
    ) -> None:
        super().__init__()
        self.modalities = check_modalities(modalities, MODALITIES)
        for m in self.modalities:
            if dims[m] <= 0:
                raise ValueError(f"modality {m!r} is on but its feature width is {dims[m]}")
        self.sequences = tuple(m for m in self.modalities if m != "text")
        self.aggregate = nn.ModuleDict(
            {
                m: build_aggregator(
                    aggregation, dims[m], clusters=clusters, dbof_size=dbof_size, nextvlad_out=nextvlad_out
                )
                for m in self.sequences
            }
        )
        in_dims = [self.aggregate[m].out_dim if m != "text" else dims["text"] for m in self.modalities]
        self.fusion = build_fusion(fusion, in_dims, k=k, o=o, dropout=mfb_dropout, norm=mfb_norm)
        if classifier == "moe":
            self.classifier: nn.Module = MoE(
                self.fusion.out_dim, num_classes, num_mixtures=num_mixtures, multi_label=multi_label
            )
        elif classifier == "linear":
            self.classifier = nn.Linear(self.fusion.out_dim, num_classes)
        else:
            raise ValueError(f"classifier must be 'moe' or 'linear', got {classifier!r}")

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        vectors = []
        for m in self.modalities:
            if m == "text":
                vectors.append(batch["text_emb"].float())  # (B, Dt)
            else:
                feats, mask = batch[f"{m[:5]}_feats"].float(), batch[f"{m[:5]}_mask"].bool()  # (B, T, D), (B, T)
                vectors.append(self.aggregate[m](feats, mask))  # (B, D_m')
        fused = self.fusion(vectors)  # (B, F)
        return {"logits": self.classifier(fused)}  # (B, C)


# default_lr 3e-3: its val choice over 3e-4 on 5 of the 6 160-video corpora of the benchmark (3 layouts x 2 seeds;
# layout means +0.09 / +0.24 / +0.03 val F_sco; docs/GENERALIZATION.md).
@register_model("mfb", default_lr=3e-3)
def mfb(
    *,
    num_classes: int,
    frame_dim: int = 1024,
    audio_dim: int = 128,
    text_dim: int = 0,
    vocab_size: int = 0,
    modalities: Sequence[str] = ("frames", "audio"),
    aggregation: str = "dbof",
    fusion: str = "mfb",
    k: int = 5,
    o: int = 1000,
    mfb_dropout: float = 0.1,
    mfb_norm: str = "relu",
    classifier: str = "moe",
    num_mixtures: int = 2,
    clusters: int = 8,
    dbof_size: int = 2000,
    nextvlad_out: int = 1024,
    multi_label: bool = False,
) -> MFBNet:
    """``aggregation`` x ``fusion`` x ``classifier`` spans the paper's tables; ``vocab_size`` is unused."""
    del vocab_size
    return MFBNet(
        num_classes=num_classes,
        dims={"frames": frame_dim, "audio": audio_dim, "text": text_dim},
        modalities=modalities,
        aggregation=aggregation,
        fusion=fusion,
        k=k,
        o=o,
        mfb_dropout=mfb_dropout,
        mfb_norm=mfb_norm,
        classifier=classifier,
        num_mixtures=num_mixtures,
        clusters=clusters,
        dbof_size=dbof_size,
        nextvlad_out=nextvlad_out,
        multi_label=multi_label,
    )
