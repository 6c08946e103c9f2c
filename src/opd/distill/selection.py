"""Token selection (token importance, TIP): per-token scores, the kept set, and quadrant diagnostics.

Shapes: N target tokens (legend in ``opd.distill.head``). Inputs per token: the student's entropy
normalised by log V (``h_N``, in [0, 1]), the divergence the loss optimises (``d_N``, nats) and, for the
q3 rule, the forward KL(teacher || student) (``fkl_N``). The rules are defined in
``opd.distill.config.SELECTION_RULES``; the step (``opd.distill.step``) calls them on a scoring pass's
values and keeps what ``keep_mask`` returns.

Statistics (the entropy's clip quantile, min-max) are over the tokens ranked together: each rollout's own
tokens in ``rollout`` scope (so a row's kept set depends on that row only, not on how rows were packed or
spread over ranks), this rank's mini-batch in ``mini_batch`` scope. Ties keep the earlier token.
"""

from __future__ import annotations

import math

import torch

from opd.distill.config import SELECTION_RULES, TokenSelection


def normalised_entropy(entropy_N: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """H(p_s) / log V: 0 for a one-hot student, 1 for a uniform one."""
    return entropy_N / math.log(max(vocab_size, 2))


def _minmax(x_N: torch.Tensor, valid_N: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the valid tokens; all zeros when they are all equal (no information)."""
    if not bool(valid_N.any()):
        return torch.zeros_like(x_N)
    lo, hi = x_N[valid_N].min(), x_N[valid_N].max()
    span = hi - lo
    if not bool(span > 0):
        return torch.zeros_like(x_N)
    return ((x_N - lo) / span).clamp(0.0, 1.0)


def clipped_entropy(h_N: torch.Tensor, valid_N: torch.Tensor, quantile: float) -> torch.Tensor:
    """h clipped at its ``quantile`` over the valid tokens (a few near-uniform tokens would otherwise
    squash everyone else's normalised entropy towards 0), then min-max normalised."""
    if bool(valid_N.any()) and quantile < 1.0:
        h_N = h_N.clamp(max=float(torch.quantile(h_N[valid_N].float(), quantile)))
    return _minmax(h_N, valid_N)


def rule_scores(
    rule: str,
    h_N: torch.Tensor,
    d_N: torch.Tensor,
    fkl_N: torch.Tensor | None = None,
    *,
    valid_N: torch.Tensor | None = None,
    clip_quantile: float = 0.98,
    generator: torch.Generator | None = None,
    group_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's score under ``rule`` (higher: kept first); with ``group_N`` the statistics are taken
    within each group (scores are only compared within a group then)."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown token-selection rule {rule!r}; choose one of {SELECTION_RULES}")
    valid_N = torch.ones_like(h_N, dtype=torch.bool) if valid_N is None else valid_N.bool()
    if group_N is not None and rule in ("soft_or", "q3"):
        score_N = torch.zeros(h_N.shape, dtype=torch.float32, device=h_N.device)
        for g in torch.unique(group_N).tolist():
            at = group_N == g
            score_N[at] = rule_scores(
                rule,
                h_N[at],
                d_N[at],
                None if fkl_N is None else fkl_N[at],
                valid_N=valid_N[at],
                clip_quantile=clip_quantile,
            )
        return score_N
    h_N, d_N = h_N.float(), d_N.float()
    if rule == "all":
        return torch.ones_like(h_N)
    if rule == "entropy":
        return h_N
    if rule == "divergence":
        return d_N
    if rule == "random":
        return torch.rand(h_N.shape, generator=generator, device="cpu").to(h_N.device)
    h_hat = clipped_entropy(h_N, valid_N, clip_quantile)
    if rule == "soft_or":  # high entropy OR high divergence, softly
        return 1.0 - (1.0 - h_hat) * (1.0 - _minmax(d_N, valid_N))
    if fkl_N is None:
        raise ValueError("the q3 rule ranks by the forward KL per token: pass fkl_N")
    return fkl_N.float() * (1.0 - h_hat)  # q3: confident (low entropy) and wrong (high forward KL)


def kept_count(n_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens kept of a group with ``n_valid`` valid tokens: floor(ratio x n), at least one (none of none).
    (The tolerance keeps e.g. 0.3 x 10 at 3 despite 0.3 * 10 = 2.9999999999999996.)"""
    n = n_valid.to(torch.float64)
    k = torch.floor(ratio * n + 1e-9).clamp(min=1.0)
    return torch.where(n > 0, k, torch.zeros_like(k)).to(torch.int64)


def keep_mask(
    score_N: torch.Tensor,
    ratio: float,
    group_N: torch.Tensor | None = None,
    valid_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool per token: in each group (``group_N``: e.g. the row of each token; None: one group) the
    ``kept_count`` valid tokens with the highest scores, ties to the earlier token. Invalid tokens (masked,
    tool output) are never kept and do not count."""
    n = score_N.shape[0]
    device = score_N.device
    valid_N = torch.ones(n, dtype=torch.bool, device=device) if valid_N is None else valid_N.bool()
    if n == 0:
        return valid_N.clone()
    if group_N is None:
        group_N = torch.zeros(n, dtype=torch.int64, device=device)
    _, gid_N = torch.unique(group_N, return_inverse=True)
    k_G = kept_count(torch.bincount(gid_N, weights=valid_N.double()), ratio)
    key_N = torch.where(
        valid_N, score_N.double(), torch.tensor(-math.inf, dtype=torch.float64, device=device)
    )
    order = torch.argsort(-key_N, stable=True)  # score descending, ties by position
    order = order[torch.argsort(gid_N[order], stable=True)]  # grouped, the order within a group kept
    g_sorted = gid_N[order]
    first = torch.searchsorted(g_sorted, g_sorted)  # where each token's group starts in the sorted order
    rank = torch.arange(n, device=device) - first
    keep_sorted = (rank < k_G[g_sorted]) & valid_N[order]
    keep_N = torch.zeros(n, dtype=torch.bool, device=device)
    keep_N[order] = keep_sorted
    return keep_N


def select(
    config: TokenSelection,
    entropy_N: torch.Tensor,
    d_N: torch.Tensor,
    fkl_N: torch.Tensor | None,
    vocab_size: int,
    group_N: torch.Tensor | None = None,
    valid_N: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The kept tokens (bool per token) under ``config``'s rule and ratio."""
    h_N = normalised_entropy(entropy_N, vocab_size)
    score_N = rule_scores(
        config.rule,
        h_N,
        d_N,
        fkl_N,
        valid_N=valid_N,
        clip_quantile=config.entropy_clip_quantile,
        generator=generator,
        group_N=group_N,
    )
    return keep_mask(score_N, config.ratio, group_N, valid_N)


QUADRANTS = (
    "q1",
    "q2",
    "q3",
    "q4",
)  # high h high d, high h low d, low h high d ("confident and wrong"), low low


def quadrant_sums(
    h_N: torch.Tensor,
    d_N: torch.Tensor,
    kept_N: torch.Tensor,
    entropy_threshold: float | None = None,
    divergence_threshold: float | None = None,
    score: str = "full",
) -> dict[str, float]:
    """Counts and sums for the step's diagnostics (summed over micro-batches and ranks, then divided):
    tokens per quadrant, kept tokens, and the entropy/divergence sums of kept and dropped tokens. A token is
    high when strictly above the threshold (None: the median of these tokens). ``score``: what is known of
    the dropped tokens (``opd.distill.head.SCORES``): the quadrants need every divergence."""
    out = dict.fromkeys(SUM_KEYS, 0.0)
    n = h_N.numel()
    if n == 0:
        return out
    h_N, d_N, kept_N = h_N.float(), d_N.float(), kept_N.bool()
    out["tokens"], out["kept"] = float(n), float(kept_N.sum())
    out["kept_entropy_sum"], out["kept_divergence_sum"] = float(h_N[kept_N].sum()), float(d_N[kept_N].sum())
    if score in ("full", "entropy"):
        out["entropy_scored"] = float(n)
        out["dropped_entropy_sum"] = float(h_N[~kept_N].sum())
    if score == "full":
        out["divergence_scored"] = float(n)
        out["dropped_divergence_sum"] = float(d_N[~kept_N].sum())
        h_thr = float(h_N.median()) if entropy_threshold is None else entropy_threshold
        d_thr = float(d_N.median()) if divergence_threshold is None else divergence_threshold
        high_h, high_d = h_N > h_thr, d_N > d_thr
        masks = (high_h & high_d, high_h & ~high_d, ~high_h & high_d, ~high_h & ~high_d)
        out.update({f"{q}_tokens": float(m.sum()) for q, m in zip(QUADRANTS, masks, strict=True)})
    return out


SUM_KEYS = (
    *(f"{q}_tokens" for q in QUADRANTS),
    "tokens",
    "kept",
    "entropy_scored",
    "divergence_scored",
    "kept_entropy_sum",
    "dropped_entropy_sum",
    "kept_divergence_sum",
    "dropped_divergence_sum",
)


def quadrant_metrics(sums: dict[str, float]) -> dict[str, float]:
    """``opd/tokens/*`` metrics from sums over the step (all ranks); the quadrants and the dropped tokens'
    values only where every token was scored."""
    tokens = max(sums["tokens"], 1.0)
    kept, dropped = sums["kept"], sums["tokens"] - sums["kept"]
    out = {"opd/selected_token_fraction": kept / tokens}
    for name in ("entropy", "divergence"):
        out[f"opd/tokens/kept_{name}"] = sums[f"kept_{name}_sum"] / max(kept, 1.0)
        if sums[f"{name}_scored"] == sums["tokens"]:
            out[f"opd/tokens/dropped_{name}"] = sums[f"dropped_{name}_sum"] / max(dropped, 1.0)
    if sums["divergence_scored"] == sums["tokens"]:
        out.update({f"opd/tokens/{q}_share": sums[f"{q}_tokens"] / tokens for q in QUADRANTS})
    return out
