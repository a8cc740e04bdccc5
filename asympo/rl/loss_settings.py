"""Each loss's settings, one pydantic class per loss (``learner.loss``), free of torch.

``learner.loss`` holds one of them, chosen by its ``name`` (a discriminated union); the
loss functions and the registry that pairs each class with its function are in
``asympo/rl/losses.py``. Kept apart so loading a configuration does not import torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Aggregation = Literal["seq-mean", "token-mean"]
DEFAULT_LOSS = "asympo"


class LossSettings(BaseModel):
    """Settings every loss has; each loss's class adds its own (``learner.loss``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    aggregation: Aggregation = Field(
        "seq-mean",
        description="seq-mean: mean over each response's tokens, then over responses; "
        "token-mean: mean over all response tokens of the batch",
    )


class AsympoLoss(LossSettings):
    """ASymPO (the default): needs no behaviour log-probs."""

    name: Literal["asympo"] = "asympo"
    nll_eps: float = Field(1e-4, gt=0, description="floor of the mean NLL ASymPO divides by")
    weight_cap: float = Field(
        0.0,
        ge=0,
        description="per-token weight clipping: a response's scale |A_i| / m_i is at most "
        "this (its tokens' weight |A_i| / (n_i m_i) at most weight_cap / n_i); 0 = off",
    )


class SpoLoss(LossSettings):
    """SPO: negative-advantage responses scaled by a fixed beta."""

    name: Literal["spo"] = "spo"
    spo_beta: float = Field(
        0.5, gt=0, le=1, description="scale of negative-advantage responses, in (0, 1]"
    )


class ReinforceLoss(LossSettings):
    """REINFORCE / GPG on the current policy, no correction."""

    name: Literal["reinforce"] = "reinforce"


class _ClippedLoss(LossSettings):
    """The clipped-ratio (PPO-style) losses' shared settings."""

    clip_eps: float = Field(
        0.2, gt=0, description="clip range of the ratio: [1 - clip_eps, 1 + clip_eps]"
    )
    clip_ratio_c: float = Field(
        3.0,
        ge=0,
        description="dual-clip bound (Ye et al. 2020, as in verl): an A < 0 token's "
        "(gspo: response's) loss is at most -A * clip_ratio_c; > 1, or 0 = off",
    )

    @field_validator("clip_ratio_c")
    @classmethod
    def _dual_clip_off_or_above_one(cls, value: float) -> float:
        if value != 0 and value <= 1:
            raise ValueError("clip_ratio_c must be 0 (off) or > 1")
        return value


class GrpoLoss(_ClippedLoss):
    """GRPO/PPO clipped surrogate on token ratios; needs behaviour log-probs."""

    name: Literal["grpo"] = "grpo"


class DapoLoss(_ClippedLoss):
    """DAPO: clip-higher and always token-mean; needs behaviour log-probs."""

    name: Literal["dapo"] = "dapo"
    aggregation: Literal["token-mean"] = Field("token-mean", description="always token-mean")
    clip_eps_high: float = Field(
        0.28, gt=0, description="upper clip range (clip-higher): [1 - clip_eps, 1 + clip_eps_high]"
    )


class GspoLoss(_ClippedLoss):
    """GSPO: one clipped sequence ratio per response; needs behaviour log-probs."""

    name: Literal["gspo"] = "gspo"


class TisLoss(LossSettings):
    """Truncated importance sampling; needs behaviour log-probs."""

    name: Literal["tis"] = "tis"
    tis_cap: float = Field(2.0, gt=0, description="truncation of the token importance weight")


# What ``learner.loss`` holds: one loss's settings, chosen by ``name``.
AnyLossSettings = Annotated[
    AsympoLoss | SpoLoss | ReinforceLoss | GrpoLoss | DapoLoss | GspoLoss | TisLoss,
    Field(discriminator="name"),
]
