"""From data and loss settings to a model's builder kwargs (one place, as timm's builder does it).

A builder declares what it needs as keyword-only arguments; the caller (training, the sweep's checks) knows the
data (dims, vocabulary, number of classes, task) and the loss weights. :func:`resolve_kwargs` joins the two:

* data-derived kwargs (``num_classes``, ``frame_dim``, ``vocab_size`` ...) are passed only to builders whose
  signature has them, and may not be set by hand (they follow from the feature shards);
* an auxiliary branch (``contrastive``, ``mlm``, ``vtm``, ``unimodal``) is switched on exactly when its loss weight is > 0 and
  the builder has the switch, so every parameter of a built model receives a gradient
  (:func:`effective_loss_weights` turns off the weight of a branch the model lacks);
* ``params`` (``model.params``) must be options of the builder.

Errors are :class:`ModelOptionError` with the offending key; the config layer turns them into its one-line
``config error: model.params.<key>: ...``. Pure Python: no Ray, no config classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from raypipe.models.registry import builder_params

logger = logging.getLogger(__name__)

# The label-free objectives: what pretraining trains, and what needs >= 2 clips per batch (in-batch negatives).
SELF_SUPERVISED_TERMS = ("contrastive", "mlm", "vtm")
# Every term with a model-side switch (a branch built only when its loss weight is > 0).
AUX_TERMS = (*SELF_SUPERVISED_TERMS, "unimodal")


class ModelOptionError(ValueError):
    """A model option that cannot be used; ``key`` is the ``model.params`` key, the message says why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"model.params.{key}: {message}")
        self.key = key


def data_kwargs(info: Any, *, num_classes: int, multi_label: bool) -> dict[str, Any]:
    """The kwargs that follow from the data: ``info`` is the feature shards' ``ShardInfo`` (or alike)."""
    tok = getattr(info, "tokenizer", None) or {}
    derived: dict[str, Any] = {
        "num_classes": num_classes,
        "frame_dim": info.frame_dim,
        "audio_dim": info.audio_dim,
        "text_dim": info.text_dim,
        "vocab_size": int(tok.get("vocab_size") or 0),
        "max_frames": info.max_frames,
        "multi_label": multi_label,
    }
    if tok.get("mask_token_id") is not None:
        derived["mask_token_id"] = int(tok["mask_token_id"])
    if tok.get("special_ids") is not None:
        derived["special_token_ids"] = [int(i) for i in tok["special_ids"]]
    return derived


def effective_loss_weights(name: str, weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` with every auxiliary term the builder of ``name`` has no switch for set to 0."""
    accepted = set(builder_params(name))
    out = dict(weights)
    for term in AUX_TERMS:
        if out.get(term, 0) > 0 and term not in accepted:
            logger.info("model %r has no %s branch: train.loss.%s=%s ignored", name, term, term, out[term])
            out[term] = 0.0
    return out


def option_problem(name: str, key: str) -> str | None:
    """Why ``key`` cannot be a ``model.params`` key of model ``name`` (None when it can be)."""
    accepted = builder_params(name)
    if key not in accepted:
        return f"{key!r} is not an option of model {name!r} (allowed: {', '.join(accepted)})"
    return None


def resolve_kwargs(
    name: str, *, info: Any, num_classes: int, multi_label: bool, loss_weights: Mapping[str, float],
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The builder kwargs of model ``name``: data-derived dims + loss switches + ``params`` (see module doc)."""
    accepted = builder_params(name)
    derived = data_kwargs(info, num_classes=num_classes, multi_label=multi_label)
    weights = effective_loss_weights(name, loss_weights)
    switches = {term: weights.get(term, 0) > 0 for term in AUX_TERMS if term in accepted}
    for key in params:
        if key not in accepted:
            allowed = [p for p in accepted if p not in derived and p not in switches]
            raise ModelOptionError(key, f"not an option of model {name!r} (allowed: {', '.join(allowed)})")
        if key in derived:
            raise ModelOptionError(key, "set from the feature shards / task, do not set it")
        if key in switches:
            raise ModelOptionError(key, f"set by train.loss.{key} (0 turns the branch off)")
    kwargs = {k: v for k, v in derived.items() if k in accepted}
    kwargs.update(switches)
    kwargs.update(params)
    return kwargs


def pretrain_problem(name: str, weights: Mapping[str, float] | None = None) -> str | None:
    """Why model ``name`` cannot pretrain (``train.pretrain``: its auxiliary objectives without labels) under the
    loss ``weights`` (None: any weight), or None. At least one weighted auxiliary term must be a head the model
    has, else it would train nothing but an unused head: DMAFNet pretrains with contrastive + MLM + VTM, CAV-Net
    with its one language-guided contrastive term (video vs the sentence embedding of its own text)."""
    from raypipe.models.registry import list_models

    have = [t for t in SELF_SUPERVISED_TERMS if t in builder_params(name)]
    if any((weights or {}).get(t, 1.0) > 0 for t in have):
        return None
    if have:
        return (f"model {name!r} pretrains with its {' / '.join(have)} head(s), which train.loss weighs 0 "
                f"(set train.loss.{have[0]} > 0)")
    able = [m for m in list_models() if any(t in builder_params(m) for t in SELF_SUPERVISED_TERMS)]
    return (f"model {name!r} has no contrastive / MLM / VTM head to pretrain (models that have one: "
            f"{', '.join(able)})")


def contrastive_loss_kind(model: Any) -> str:
    """The contrastive loss a model was designed with: its ``contrastive_loss`` attribute (CAV-Net: InfoNCE),
    MIL-NCE otherwise (DMAFNet's paper, Eq. 9)."""
    return getattr(model, "contrastive_loss", None) or "milnce"
