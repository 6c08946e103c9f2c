"""Per-sample weights for distillation, computed on the driver over the whole rollout batch.

Shapes: B rollout rows (``rollout.n`` per prompt; rows of one prompt share a ``uid``).

The step divides the weighted loss by the weights' global sum (``opd.distill.step``: the normaliser is
summed over every rank), so a weight acts on the whole batch, however its rows are split across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# pass-rate histogram bins (paced/pass_rate/...): never solved, solved sometimes (by quarter), always solved
PASS_RATE_BINS = (("0", 0.0, 0.0), ("0-25", 0.0, 0.25), ("25-50", 0.25, 0.5), ("50-75", 0.5, 0.75))
PASS_RATE_BINS += (("75-100", 0.75, 1.0), ("1", 1.0, 1.0))


def reward_weights(rewards_B: torch.Tensor, reward_beta: float) -> torch.Tensor:
    """The original repository's reward-weighted distillation: w = softmax(r / reward_beta) * B over the batch.

    ``reward_beta <= 0`` turns weighting off (all ones). Small beta concentrates the loss on rewarded
    samples; large beta tends to uniform weights. The mean weight is 1, so the loss scale is unchanged.
    """
    rewards_B = rewards_B.float()
    if reward_beta <= 0:
        return torch.ones_like(rewards_B)
    return torch.softmax(rewards_B / reward_beta, dim=0) * rewards_B.numel()


def pass_rates(scores_B: torch.Tensor, uids_B: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_B, group_B): each row's prompt pass rate (the fraction of that uid's rows with score > 0) and the
    index of its uid group (in order of first appearance)."""
    if len(uids_B) != scores_B.numel():
        raise ValueError(f"{scores_B.numel()} scores but {len(uids_B)} uids: one uid per rollout row")
    index: dict = {}
    group_B = torch.tensor([index.setdefault(uid, len(index)) for uid in uids_B], dtype=torch.long)
    passed_B = (scores_B.float() > 0).float()
    passes_G = torch.zeros(len(index)).index_add_(0, group_B, passed_B)
    samples_G = torch.zeros(len(index)).index_add_(0, group_B, torch.ones_like(passed_B))
    return (passes_G / samples_G)[group_B], group_B


def pass_rate_weights(
    scores_B: torch.Tensor, uids_B: Sequence, alpha: float = 1.0, beta: float = 1.0, normalise: str = "mean"
) -> torch.Tensor:
    """PACED's weights: w = p^alpha (1 - p)^beta, p = the row's prompt pass rate over its samples (a sample
    passes when its score is > 0), the same for every sample of a prompt.

    ``normalise="mean"``: scaled so that the rows with w > 0 have mean weight 1 (so the weighted loss keeps
    the scale of unweighted distillation); ``"none"``: the raw w(p). With alpha, beta > 0, prompts solved
    always or never (p in {0, 1}) weigh 0, and so does a prompt with a single sample. All zeros when no row
    keeps a weight."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha={alpha}, beta={beta}: the exponents must be >= 0")
    if normalise not in ("mean", "none"):
        raise ValueError(f"normalise={normalise!r}: choose 'mean' or 'none'")
    p_B, _ = pass_rates(scores_B, uids_B)
    # float64: p^alpha (1 - p)^beta underflows nothing at the pass rates rollout.n allows
    weights_B = (p_B.double().pow(alpha) * (1.0 - p_B.double()).pow(beta)).float()
    kept_B = weights_B > 0
    if normalise == "mean" and kept_B.any():
        weights_B = weights_B / weights_B[kept_B].mean()
    return weights_B


def pass_rate_metrics(scores_B: torch.Tensor, uids_B: Sequence, weights_B: torch.Tensor) -> dict[str, float]:
    """The batch's prompts by pass rate (fractions of prompts per bin), and the prompts and rows kept."""
    p_B, group_B = pass_rates(scores_B, uids_B)
    n_groups = int(group_B.max()) + 1 if len(group_B) else 0
    p_G = torch.zeros(n_groups).index_copy_(0, group_B, p_B)
    kept_G = torch.zeros(n_groups).index_add_(0, group_B, (weights_B > 0).float()) > 0
    metrics = {"paced/pass_rate_mean": float(p_G.mean()) if n_groups else 0.0}
    for name, low, high in PASS_RATE_BINS:
        if low == high:
            in_bin = p_G == low
        else:
            in_bin = (p_G > low) & ((p_G <= high) if high < 1.0 else (p_G < high))
        metrics[f"paced/pass_rate/{name}"] = float(in_bin.float().mean()) if n_groups else 0.0
    metrics.update(
        {
            "paced/prompts": float(n_groups),
            "paced/kept_prompts": float(kept_G.sum()),
            "paced/kept_prompt_fraction": float(kept_G.float().mean()) if n_groups else 0.0,
            "paced/kept_rows": float((weights_B > 0).sum()),
        }
    )
    return metrics


def sample_weights(
    method: str,
    scores_B: torch.Tensor,
    uids_B: Sequence | None,
    *,
    reward_beta: float = 0.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    normalise: str = "mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured weighting (``OPDConfig.weighting``: none | reward_softmax | paced) and its metrics."""
    if method == "none":
        return torch.ones(scores_B.numel()), {}
    if method == "reward_softmax":
        return reward_weights(scores_B, reward_beta), {}
    if method != "paced":
        raise ValueError(f"unknown sample weighting {method!r}")
    if uids_B is None:
        raise ValueError(
            "paced weighting needs the rollout batch's `uid` column (rows of one prompt share it)"
        )
    weights_B = pass_rate_weights(scores_B, uids_B, alpha, beta, normalise)
    return weights_B, pass_rate_metrics(scores_B, uids_B, weights_B)
