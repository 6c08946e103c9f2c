"""Per-sample weights for distillation (a hook: reward weighting now, pass-rate weighting later)."""

from __future__ import annotations

import torch


def reward_weights(rewards_B: torch.Tensor, reward_beta: float) -> torch.Tensor:
    """The seed's reward-weighted distillation: w = softmax(r / reward_beta) * B over the batch.

    ``reward_beta <= 0`` turns weighting off (all ones). Small beta concentrates the loss on rewarded
    samples; large beta tends to uniform weights. The mean weight is 1, so the loss scale is unchanged.
    """
    rewards_B = rewards_B.float()
    if reward_beta <= 0:
        return torch.ones_like(rewards_B)
    return torch.softmax(rewards_B / reward_beta, dim=0) * rewards_B.numel()
