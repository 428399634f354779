"""Config of an evaluation-time corruption (owned by raypipe.corruptions, used by ``raypipe eval``).

Lives in the config package (not in :mod:`raypipe.corruptions`) so an eval config section can nest it without
importing torch or creating an import cycle.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raypipe.config.base import StrictModel

CorruptionKind = Literal["none", "drop_features", "drop_tokens", "gaussian_noise", "zero_modality"]

# Which options each kind reads; setting another one is rejected so a typo'd experiment fails up front.
KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "drop_features": ("p",),
    "drop_tokens": ("p",),
    "gaussian_noise": ("std", "relative"),
    "zero_modality": ("modality",),
}


class CorruptionConfig(StrictModel):
    """One corruption applied to every evaluation batch (DMAFNet robustness: drop 30 %, Gaussian noise).

    ``drop_features`` drops frame and audio vectors, ``drop_tokens`` text tokens (and the row's pooled
    ``text_emb`` with the same probability), each with probability ``p``.

    ``seed`` seeds the generator of the random corruptions, so two evaluations of one model see the same
    dropped frames and the same noise.
    """

    kind: CorruptionKind = "none"
    p: float = Field(default=0.3, ge=0, le=1)
    std: float = Field(default=0.1, ge=0)
    relative: bool = False
    modality: Literal["frames", "audio", "text"] = "frames"
    seed: int = 0

    @model_validator(mode="after")
    def _only_options_of_the_kind(self) -> CorruptionConfig:
        allowed = set(KIND_PARAMS[self.kind]) | {"kind", "seed"}
        # Options left at their default are not stray: a full ``model_dump()`` must validate again.
        stray = sorted(
            name
            for name in set(self.model_fields_set) - allowed
            if getattr(self, name) != type(self).model_fields[name].default
        )
        if stray:
            raise ValueError(
                f"option(s) {stray} are not used by kind={self.kind!r}; it reads {list(KIND_PARAMS[self.kind]) or 'none'}"
            )
        return self

    def params(self) -> dict[str, Any]:
        """Keyword arguments of :func:`raypipe.corruptions.apply_corruption` for this kind."""
        return {name: getattr(self, name) for name in KIND_PARAMS[self.kind]}
