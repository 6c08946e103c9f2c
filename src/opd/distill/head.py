"""The fused output-head divergence: from final hidden states to the loss and its gradients, chunk by chunk.

Shapes: N target tokens, H hidden size, W the output head's rows (its width, often padded beyond the
tokenizer), V the compared vocabulary (the tokenizer's size, V <= W), c a chunk's tokens.

Why: the student's logits for N target tokens are an N x V tensor (16k tokens x 151,936 x 4 B = 10 GB in
fp32) and autograd keeps it, plus a gradient of the same size, until the backward. Here, per chunk of c
tokens: logits_c_V = hidden_c_H @ head_V_H.T (+ bias), the divergence and its closed-form gradient wrt
those logits (``opd.distill.losses``, written into the logits' own storage), then the gradients wrt the
hidden states (grad_c_V @ head_V_H) and the head (grad_c_V.T @ hidden_c_H, accumulated). No c x V tensor
outlives its chunk, in forward or backward; what autograd keeps is N x H and W x H (the head's gradient,
which exists on any path).

The loss is linear in the per-token divergences, ``loss = sum_n coef_N[n] * div_N[n]``, with the
coefficients (sample weight / global normaliser, token selection) known before the pass, so the gradients
are complete after the forward; the backward only scales them by the upstream scalar. Exactly the
divergences and teacher signals of ``token_divergence`` (they share the per-chunk code).

Accumulation: the head's gradient adds one chunk at a time in the head's dtype (``addmm_``; each chunk's
product accumulates in fp32 inside the matmul): bit-for-bit autograd's in fp32, one rounding per chunk in
bf16 (chunk_size 1024: a few chunks per micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opd.distill.losses import _compute, _plan
from opd.distill.teacher_signal import TeacherSignal

# what a no-grad pass (the scoring pass of a selector, or a pass without gradients) computes per token:
# full: divergence and entropy (the teacher's side too); entropy: the student's entropy only (no teacher:
# a rule ranking by entropy needs no more); none: nothing (a rule that needs no values, e.g. random)
SCORES = ("full", "entropy", "none")

# a token-selection rule: (div_N, entropy_N, fkl_N or None, group_N or None) of a set of target tokens -> a
# factor per token (0 drops it), or None to keep them all. With ``group_N`` (each token's row) the rule may
# be called once per chunk of whole rows, so it must rank each row among its own tokens.
Selector = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor | None
]


@dataclass
class HeadDivergence:
    loss: torch.Tensor  # scalar, differentiable wrt the hidden states, head weight and bias
    div_N: torch.Tensor  # fp32, detached: every target token's divergence
    entropy_N: torch.Tensor  # fp32, detached: the student's entropy per target token
    selected_N: torch.Tensor | None  # the selector's factor per token (None: no selector)
    fkl_N: torch.Tensor | None = None  # fp32, detached: forward KL(teacher || student) per token (want_fkl)
    score: str = "full"  # what the no-grad pass computed for every token (SCORES); kept tokens have both


@dataclass
class _Spec:
    teacher: TeacherSignal
    kind: str
    beta: float
    vocab: int
    chunk_size: int
    coef_N: torch.Tensor
    select: Selector | None
    need_grad: bool
    want_fkl: bool
    skip_zero_coef: bool
    score: str
    group_N: torch.Tensor | None


def head_divergence(
    hidden_N_H: torch.Tensor,
    weight_W_H: torch.Tensor,
    bias_W: torch.Tensor | None,
    teacher: TeacherSignal,
    kind: str,
    *,
    coef_N: torch.Tensor | None = None,
    select: Selector | None = None,
    want_fkl: bool = False,
    skip_zero_coef: bool = False,
    score: str = "full",
    group_N: torch.Tensor | None = None,
    beta: float = 0.5,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> HeadDivergence:
    """``loss = sum_n coef_N[n] * select_N[n] * div_N[n]`` with ``div_N`` the divergence ``kind`` between the
    student's distribution at ``hidden_N_H @ weight_W_H[:V].T + bias`` and ``teacher`` (one row per token).

    ``coef_N`` defaults to ones. With a ``select`` rule the divergences and entropies of all tokens are
    computed first without gradients (a scoring pass over the head only), the rule's factors multiply
    ``coef_N``, and the gradient pass visits only the tokens whose coefficient is non-zero (as it does
    with ``skip_zero_coef``: their divergence and entropy stay 0). ``want_fkl``: also each token's forward
    KL from the same pass (the scoring pass's, with a rule). ``score`` (SCORES): what the scoring pass, or a
    pass without gradients, computes for every token; tokens it leaves out get 0 (the gradient pass still
    gives the kept tokens' divergence and entropy). ``group_N`` (each token's row, rows contiguous): a
    ``select`` rule that ranks each row among its own tokens; with ``score="full"`` and every row within
    ``chunk_size`` tokens the scoring and the gradient then share one pass (``_fused_select``): each chunk
    of whole rows gets its logits, divergences and their gradient once, the rule picks the kept tokens from
    them, and the two gradient matmuls run for those only (no recomputation of logits or teacher).
    ``vocab_size`` compares the first V columns (the tokenizer's); head rows beyond it get zero gradient.
    """
    if hidden_N_H.ndim != 2 or weight_W_H.ndim != 2 or hidden_N_H.shape[1] != weight_W_H.shape[1]:
        raise ValueError(
            f"hidden_N_H {tuple(hidden_N_H.shape)} and weight_W_H {tuple(weight_W_H.shape)} must share the "
            "hidden size"
        )
    vocab = weight_W_H.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab <= weight_W_H.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {weight_W_H.shape[0]}] (the head's rows)")
    n = hidden_N_H.shape[0]
    if teacher.num_tokens != n:
        raise ValueError(f"{n} hidden states but the teacher signal has {teacher.num_tokens} tokens")
    if score not in SCORES:
        raise ValueError(f"score={score!r}: choose one of {SCORES}")
    if want_fkl and score != "full":
        raise ValueError("want_fkl needs score='full' (the forward KL comes with the divergence)")
    if coef_N is None:
        coef_N = torch.ones(n, dtype=torch.float32, device=hidden_N_H.device)
    elif coef_N.shape != (n,):
        raise ValueError(f"coef_N must have shape ({n},), got {tuple(coef_N.shape)}")
    inputs = [t for t in (hidden_N_H, weight_W_H, bias_W) if t is not None]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    spec = _Spec(
        teacher,
        kind,
        beta,
        vocab,
        chunk_size,
        coef_N.detach().float(),
        select,
        need_grad,
        want_fkl,
        skip_zero_coef,
        score,
        group_N,
    )
    loss, div_N, entropy_N, selected_N, fkl_N = _HeadDivergenceFn.apply(hidden_N_H, weight_W_H, bias_W, spec)
    return HeadDivergence(
        loss, div_N, entropy_N, None if select is None else selected_N, fkl_N if want_fkl else None, score
    )


class _HeadDivergenceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_N_H, weight_W_H, bias_W, spec: _Spec):
        n, device = hidden_N_H.shape[0], hidden_N_H.device
        head_V_H = weight_W_H[: spec.vocab]
        bias_V = None if bias_W is None else bias_W[: spec.vocab]
        div_N = torch.zeros(n, dtype=torch.float32, device=device)
        entropy_N = torch.zeros(n, dtype=torch.float32, device=device)
        coef_N = spec.coef_N.to(device)
        selected_N = torch.ones(n, dtype=torch.float32, device=device)
        fkl_N = torch.zeros(n, dtype=torch.float32, device=device)
        fkl_into = fkl_N if spec.want_fkl else None
        rows_N = torch.arange(n, device=device)
        if spec.skip_zero_coef:
            rows_N = coef_N.nonzero().flatten()
        fused = (
            _row_chunks(spec) if spec.select is not None and spec.score == "full" and spec.need_grad else None
        )
        if fused is not None:  # scoring and gradient in one pass per chunk of whole rows
            grads = (
                torch.zeros_like(hidden_N_H),
                torch.zeros_like(weight_W_H),
                None if bias_W is None else torch.zeros_like(bias_W),
            )
            for idx in fused:
                _fused_select(
                    spec,
                    hidden_N_H,
                    head_V_H,
                    bias_V,
                    idx,
                    coef_N,
                    grads,
                    div_N,
                    entropy_N,
                    selected_N,
                    fkl_N,
                )
            coef_N = coef_N * selected_N
            loss = (coef_N * div_N).sum()
            ctx.grads = grads
            ctx.mark_non_differentiable(div_N, entropy_N, selected_N, fkl_N)
            return loss, div_N, entropy_N, selected_N, fkl_N
        if spec.select is not None:  # scoring pass: every token's divergence and entropy, no gradient
            for idx in _chunks(rows_N, spec.chunk_size) if spec.score != "none" else ():
                if spec.score == "entropy":
                    _entropy_chunk(hidden_N_H, head_V_H, bias_V, idx, entropy_N)
                else:
                    _chunk(spec, hidden_N_H, head_V_H, bias_V, idx, div_N, entropy_N, None, fkl_into)
            fkl_into = None  # the gradient pass leaves the scores as they are
            factor_N = spec.select(
                div_N.clone(),
                entropy_N.clone(),
                fkl_N.clone() if spec.want_fkl else None,
                None if spec.group_N is None else spec.group_N.to(device),
            )
            if factor_N is not None:
                selected_N = factor_N.detach().to(device, torch.float32)
                if selected_N.shape != (n,):
                    raise ValueError(
                        f"the token selector returned shape {tuple(selected_N.shape)}, not ({n},)"
                    )
                coef_N = coef_N * selected_N
            rows_N = coef_N.nonzero().flatten() if spec.need_grad else rows_N[:0]
        grads = None
        if spec.need_grad:
            grads = (
                torch.zeros_like(hidden_N_H),
                torch.zeros_like(weight_W_H),
                None if bias_W is None else torch.zeros_like(bias_W),
            )
        if spec.select is None or spec.need_grad:
            for idx in _chunks(rows_N, spec.chunk_size):
                if grads is None and spec.score != "full":  # no_grad: values only, as few as asked
                    if spec.score == "entropy":
                        _entropy_chunk(hidden_N_H, head_V_H, bias_V, idx, entropy_N)
                    continue
                grad_into = None if grads is None else (coef_N, grads)
                _chunk(spec, hidden_N_H, head_V_H, bias_V, idx, div_N, entropy_N, grad_into, fkl_into)
        loss = (coef_N * div_N).sum()
        ctx.grads = grads
        ctx.mark_non_differentiable(div_N, entropy_N, selected_N, fkl_N)
        return loss, div_N, entropy_N, selected_N, fkl_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_entropy, _grad_selected, _grad_fkl):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("head_divergence: a second backward (its gradients are handed over once)")
        return (
            *(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads),
            None,
        )


def _chunks(rows_N: torch.Tensor, size: int) -> Iterator[torch.Tensor | slice]:
    """Consecutive row ranges as slices (no gather) when the rows are all tokens, else index tensors."""
    n = rows_N.shape[0]
    contiguous = n == 0 or int(rows_N[-1]) - int(rows_N[0]) == n - 1
    for start in range(0, n, size):
        if contiguous:
            first = int(rows_N[start])
            yield slice(first, first + min(size, n - start))
        else:
            yield rows_N[start : start + size]


def _chunk(spec: _Spec, hidden_N_H, head_V_H, bias_V, idx, div_N, entropy_N, grad_into, fkl_N=None) -> None:
    """One chunk's logits, divergence and entropy (and forward KL into ``fkl_N``); with
    ``grad_into=(coef_N, grads)`` also the chunk's gradients wrt the hidden rows and the head (added into
    ``grads``)."""
    hidden_c_H = hidden_N_H[idx]
    logits_c_V = F.linear(hidden_c_H, head_V_H, bias_V)  # the head's dtype, like the model's own head
    need_grad = grad_into is not None
    plan = _plan(
        logits_c_V,
        spec.teacher.slice(idx),
        spec.kind,
        spec.beta,
        logits_c_V.shape[0] or 1,
        None,
        spec.vocab,
        overwrite=False,
    )
    plan.need_grad, plan.overwrite = need_grad, need_grad  # the chunk's logits are ours: reuse their storage
    fkl_c = (
        None
        if fkl_N is None
        else torch.zeros(logits_c_V.shape[0], dtype=plan.compute_dtype, device=div_N.device)
    )
    div_c, entropy_c, grad_c_V, row_scale_c = _compute(plan, need_grad, fkl_c)
    div_N[idx], entropy_N[idx] = div_c.float(), entropy_c.float()
    if fkl_N is not None:
        fkl_N[idx] = fkl_c.float()
    if not need_grad:
        return
    coef_N, grads = grad_into
    grad_c_V.mul_((coef_N[idx] * row_scale_c).to(grad_c_V.dtype)[:, None])
    _gradient_matmuls(spec, grad_c_V, hidden_c_H, head_V_H, idx, grads)


def _gradient_matmuls(spec: _Spec, grad_k_V, hidden_k_H, head_V_H, idx, grads) -> None:
    """The gradients wrt the hidden rows ``idx`` and the head from their logits' gradient rows."""
    grad_hidden_N_H, grad_weight_W_H, grad_bias_W = grads
    grad_hidden_N_H[idx] = grad_k_V @ head_V_H
    grad_weight_W_H[: spec.vocab].addmm_(grad_k_V.t(), hidden_k_H)
    if grad_bias_W is not None:
        grad_bias_W[: spec.vocab].add_(grad_k_V.sum(0))


def _row_chunks(spec: _Spec) -> list[slice] | None:
    """Consecutive runs of whole rows of at most ``chunk_size`` tokens; None when rows are not given or one
    is longer than a chunk (its tokens could not be ranked within one chunk)."""
    if spec.group_N is None:
        return None
    group_N = spec.group_N.cpu()
    n = group_N.shape[0]
    if n == 0:
        return []
    starts = [0, *(torch.nonzero(group_N[1:] != group_N[:-1]).flatten() + 1).tolist()]
    bounds = [*starts, n]
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    if max(lengths) > spec.chunk_size or len(set(group_N.tolist())) != len(starts):  # long or split rows
        return None
    chunks, first, size = [], 0, 0
    for start, length in zip(starts, lengths, strict=True):
        if size and size + length > spec.chunk_size:
            chunks.append(slice(first, start))
            first, size = start, 0
        size += length
    chunks.append(slice(first, n))
    return chunks


def _fused_select(
    spec, hidden_N_H, head_V_H, bias_V, idx, coef_N, grads, div_N, entropy_N, selected_N, fkl_N
):
    """One chunk of whole rows: logits, divergence, entropy and the divergence's gradient for every token
    (what the all-token path computes), the selector's kept tokens from them, then the gradient matmuls for
    the kept rows only (the logits' gradient rows of kept tokens moved to the front of their buffer)."""
    hidden_c_H = hidden_N_H[idx]
    logits_c_V = F.linear(hidden_c_H, head_V_H, bias_V)
    plan = _plan(
        logits_c_V, spec.teacher.slice(idx), spec.kind, spec.beta, logits_c_V.shape[0], None, spec.vocab
    )
    plan.need_grad = plan.overwrite = True  # the chunk's logits are ours: the gradient goes into them
    fkl_c = (
        torch.zeros(logits_c_V.shape[0], dtype=plan.compute_dtype, device=div_N.device)
        if spec.want_fkl
        else None
    )
    div_c, entropy_c, grad_c_V, row_scale_c = _compute(plan, True, fkl_c)
    div_N[idx], entropy_N[idx] = div_c.float(), entropy_c.float()
    if fkl_c is not None:
        fkl_N[idx] = fkl_c.float()
    factor_c = spec.select(
        div_c.float(),
        entropy_c.float(),
        None if fkl_c is None else fkl_c.float(),
        spec.group_N[idx].to(div_N.device),
    )
    if factor_c is not None:
        selected_N[idx] = factor_c.detach().to(selected_N.device, torch.float32)
    coef_c = coef_N[idx] * selected_N[idx]
    keep = coef_c.nonzero().flatten()
    for j, src in enumerate(keep.tolist()):  # compact in place: j <= src, so no row is overwritten unread
        if j != src:
            grad_c_V[j].copy_(grad_c_V[src])
    k = keep.shape[0]
    if k == 0:
        return
    grad_k_V = grad_c_V[:k].mul_((coef_c[keep] * row_scale_c[keep]).to(grad_c_V.dtype)[:, None])
    _gradient_matmuls(spec, grad_k_V, hidden_c_H[keep], head_V_H, idx.start + keep, grads)


_ENTROPY_ROWS = 64  # rows of a chunk's logits softmaxed at once (two fp32 temporaries of rows x V)


def _entropy_chunk(hidden_N_H, head_V_H, bias_V, idx, entropy_N) -> None:
    """The student's entropy of a chunk's tokens from its logits alone (no teacher)."""
    logits_c_V = F.linear(hidden_N_H[idx], head_V_H, bias_V)
    out = []
    for start in range(0, logits_c_V.shape[0], _ENTROPY_ROWS):
        z = logits_c_V[start : start + _ENTROPY_ROWS].float()
        out.append(torch.special.entr(torch.softmax(z, -1)).sum(-1))  # 0 log 0 = 0
    if out:
        entropy_N[idx] = torch.cat(out)


@contextmanager
def output_head_replaced(model: torch.nn.Module, fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
    """Within the block, the model's output head computes ``fn(head, hidden_1_N_H)`` instead of its logits.

    Why inside the model's forward: under FSDP the head's weight is gathered (and on the compute device)
    only while the model runs, and its gradient reaches the sharded parameter only through that forward's
    graph. Call the model with ``logits_to_keep=<index tensor>`` so the head sees the target positions
    only; whatever ``fn`` returns comes back as the output's ``logits``.
    """
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(
            f"{type(model).__name__} transforms its logits after the output head (final_logit_softcapping): "
            "the fused output-head divergence does not support it"
        )
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output head with a weight (get_output_embeddings)")
    had_own = "forward" in head.__dict__
    own = head.__dict__.get("forward")
    head.forward = lambda hidden: fn(head, hidden)
    try:
        yield head
    finally:
        if had_own:
            head.forward = own
        else:
            del head.forward
