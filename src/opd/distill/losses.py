"""Per-token student-teacher divergences over the vocabulary, with the gradient written in closed form.

Why: the seed implementation log-softmaxed each chunk of tokens in fp32 and let autograd keep every chunk's
graph until one backward, so its "chunking" bounded nothing (several fp32 N x V tensors stay alive). Here
the forward pass computes, chunk by chunk, the divergence *and* its gradient wrt the student logits, writes
the gradient rows into one preallocated N x V buffer (the input's dtype: the only N x V allocation that
outlives a chunk), and the backward pass only scales those rows by the upstream per-token gradient (times a
per-row factor, e.g. a softmax normaliser, left out in the forward pass to save a pass over the row). The
buffer is handed to autograd as the gradient itself; a second backward through the same graph
(retain_graph=True) recomputes it.

Closed-form gradients wrt the student logits z (p = softmax(z), s = log p, q = teacher probs, t = log q):

- reverse KL  R = sum p (s - t):                      dR/dz = p * (d - R),  d = s - t
- forward KL  F = sum q (t - s):                      dF/dz = p - q
- JSD(beta)   J = beta KL(q||m) + (1-beta) KL(p||m),  m = beta q + (1-beta) p:
  dJ/dp_i (p treated as free) = (1-beta)(s_i - log m_i)  [the beta KL(q||m) term contributes
  -beta(1-beta) q_i/m_i, the other term (1-beta)(1 + s_i - log m_i - (1-beta) p_i/m_i), and
  (beta q_i + (1-beta) p_i)/m_i = 1]; through the softmax Jacobian dp_i/dz_j = p_i (delta_ij - p_j):
  dJ/dz = (1-beta) p * (s - log m - KL(p||m)).

Teacher signals (``TeacherSignal``) and what they support:

- ``logits`` / ``hidden``: all three divergences, exact (hidden: teacher logits recomputed per chunk from
  the hidden states and the teacher's output head, in the head's dtype).
- ``topk``: all three divergences over K+1 buckets (the teacher's top-k tokens and one tail bucket holding
  the rest of each distribution): approximate. With bucket probabilities P (student) and Q (teacher), the
  divergence's gradient wrt the bucket logits is P*c with c as above; a vocabulary entry j in bucket b gets
  p_j * c_b (d P_b / d z_j = p_j (1[j in b] - P_b)).
- ``sampled``: reverse KL only, the standard on-policy estimator (Tinker, verl): per token the value is
  k1 = log p_s(y) - log p_t(y) for the sampled token y, and the gradient is REINFORCE with k1 as a detached
  negative advantage, k1 * grad log p_s(y) = k1 * (onehot(y) - p). Unbiased for grad KL(p_s||p_t) when y
  was sampled from the student (the score term E[grad log p_s] vanishes).

Infinities: -inf logits (masked vocabulary entries) follow 0 log 0 = 0 and give no NaN. Where the student has
mass and the teacher none (p > 0, q = 0) reverse KL is +inf, and where q > 0 = p forward KL is +inf (their
gradients are then not finite): mask such entries in both models. JSD is always finite.

Vocabulary widths: heads are often padded beyond the tokenizer (student 151,936 vs teacher 152,064); both
distributions are taken over the tokenizer's first ``vocab_size`` columns (``aligned_vocab_size``) and
student columns beyond it get zero gradient.

On CPU, rows are processed one at a time by ``torch.get_num_threads()`` worker threads that each run
torch single-threaded (restored afterwards): a row's buffers (0.6 MB each at V=151,936) stay in cache, and
no op waits at an intra-op barrier for a core that another process holds. ``chunk_size`` then only caps
the rows done at once. On other devices each step handles ``chunk_size`` rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from opd.distill.config import DIVERGENCES, SUPPORTED
from opd.distill.teacher_signal import TeacherSignal

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "sum")

# CPU blocking (measured on 2 cores at V=151,936): a work item is a few rows handed to a worker thread; each
# row is then processed on its own (~0.6 MB per fp32 row buffer, so a row's buffers stay in L2).
_CPU_ITEM_ROWS = 8
_CPU_HIDDEN_ITEM_ROWS = (
    32  # hidden mode: a worker multiplies this many rows by the teacher head at once (32 x V fp32 = 19 MB)
)
_CPU_ROWS = 1


def aligned_vocab_size(student_width: int, teacher_width: int, tokenizer_size: int) -> int:
    """Columns to compare when the two output heads differ in width but share a tokenizer."""
    if tokenizer_size <= 0:
        raise ValueError(f"tokenizer_size must be positive, got {tokenizer_size}")
    for name, width in (("student", student_width), ("teacher", teacher_width)):
        if tokenizer_size > width:
            raise ValueError(
                f"the tokenizer has {tokenizer_size} tokens but the {name} output head only {width} columns: "
                "student and teacher must share the tokenizer they were trained with"
            )
    return tokenizer_size


def token_divergence(
    student_logits_N_V: torch.Tensor,
    teacher: TeacherSignal,
    kind: str,
    beta: float = 0.5,
    chunk_size: int = 1024,
    mask_N: torch.Tensor | None = None,
    vocab_size: int | None = None,
    overwrite_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence (differentiable wrt the student logits) and student entropy (detached), both
    fp32 (fp64 for fp64 logits), shape (N,).

    ``kind`` is one of ``DIVERGENCES`` (``SUPPORTED`` lists them per teacher mode); ``beta`` is JSD's
    mixture weight of the teacher. Masked tokens (mask 0) get divergence 0, entropy 0 and zero gradient.
    ``vocab_size`` (the tokenizer's size) is required when the two heads differ in width.

    ``overwrite_logits=True`` writes the gradient into the student logits' own storage instead of a new
    N x V buffer (the logits are garbage afterwards): for logits that nothing else reads, such as an output
    head's result whose only consumer is this loss. Should another autograd node have saved them, its
    backward fails loudly (the shared version counter), never silently. Not for leaf tensors whose ``.grad``
    is accumulated: the gradient would alias the leaf's data; use ``torch.autograd.grad`` there.
    """
    plan = _plan(student_logits_N_V, teacher, kind, beta, chunk_size, mask_N, vocab_size, overwrite_logits)
    return _TokenDivergence.apply(student_logits_N_V, plan)


def reduce_divergence(
    div_N: torch.Tensor,
    mask_N: torch.Tensor | None = None,
    weight_N: torch.Tensor | None = None,
    mode: str = "token_mean",
    seq_ids_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss from per-token divergences; masked tokens and zero total weight contribute 0 (no NaN).

    - ``token_mean``: sum(w * mask * div) / sum(w * mask); per-sample weights w (e.g. reward weights, the
      seed's sum_i w_i loss_i / sum_i w_i) are passed per token, broadcast by the caller; weights are >= 0.
    - ``seq_mean_token_mean``: each sequence's weighted token mean, then the mean over sequences weighted by
      each sequence's mean token weight; ``seq_ids_N`` says which sequence each token belongs to.
    - ``sum``: sum(w * mask * div).
    """
    if mode not in REDUCTIONS:
        raise ValueError(f"unknown reduction {mode!r}; choose one of {REDUCTIONS}")
    if div_N.ndim != 1:
        raise ValueError(f"div_N must have shape (N,), got {tuple(div_N.shape)}")
    wm_N = torch.ones_like(div_N)
    for name, t in (("mask_N", mask_N), ("weight_N", weight_N)):
        if t is not None:
            if t.shape != div_N.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, div_N {tuple(div_N.shape)}")
            wm_N = wm_N * t.to(div_N.dtype)
    weighted_N = div_N * wm_N
    if mode == "sum":
        return weighted_N.sum()
    if mode == "token_mean":
        return weighted_N.sum() / _nonzero(wm_N.sum())
    if seq_ids_N is None or seq_ids_N.shape != div_N.shape:
        raise ValueError("seq_mean_token_mean needs seq_ids_N of shape (N,): the sequence of each token")
    seqs, seq_N = torch.unique(seq_ids_N, return_inverse=True)
    num_S, den_S, count_S = (
        torch.zeros(len(seqs), dtype=div_N.dtype, device=div_N.device).index_add(0, seq_N, x)
        for x in (weighted_N, wm_N, torch.ones_like(div_N) if mask_N is None else mask_N.to(div_N.dtype))
    )
    seq_weight_S = den_S / _nonzero(count_S)  # mean token weight of each sequence's active tokens
    seq_loss_S = num_S / _nonzero(den_S)
    return (seq_weight_S * seq_loss_S).sum() / _nonzero(seq_weight_S.sum())


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, x, torch.ones_like(x))


@dataclass
class _Plan:
    student_N_V: torch.Tensor  # detached
    teacher: TeacherSignal
    kind: str
    beta: float
    vocab: int  # compared columns
    mask_N: torch.Tensor | None  # bool
    chunk_size: int
    need_grad: bool
    overwrite: bool  # the gradient goes into student_N_V's storage

    @property
    def compute_dtype(self) -> torch.dtype:  # fp32, or fp64 for fp64 logits (gradcheck)
        return torch.float64 if self.student_N_V.dtype == torch.float64 else torch.float32


def _plan(z, teacher, kind, beta, chunk_size, mask_N, vocab_size, overwrite=False) -> _Plan:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    if not isinstance(teacher, TeacherSignal):
        raise TypeError(f"teacher must be a TeacherSignal, got {type(teacher).__name__}")
    if kind not in SUPPORTED[teacher.mode]:
        raise ValueError(
            f"teacher mode {teacher.mode!r} supports only {SUPPORTED[teacher.mode]} (an unbiased estimator from "
            f"the sampled token); for {kind} store the teacher as 'topk' (approximate) or 'logits'/'hidden' (exact)"
        )
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs beta strictly between 0 and 1, got {beta}: at 0 or 1 the mixture is one of the two "
            "distributions and JSD is identically 0; use e.g. beta=0.5, or forward_kl/reverse_kl"
        )
    if z.ndim != 2 or not z.is_floating_point():
        raise ValueError(
            f"student logits must be a float tensor of shape (N, V), got {z.dtype} {tuple(z.shape)}"
        )
    if teacher.num_tokens != z.shape[0]:
        raise ValueError(f"student has {z.shape[0]} tokens but the teacher signal {teacher.num_tokens}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    student_width, teacher_width = z.shape[1], teacher.vocab_width
    if vocab_size is not None:
        vocab = aligned_vocab_size(student_width, teacher_width or student_width, vocab_size)
    elif teacher_width not in (None, student_width):
        raise ValueError(
            f"student logits have {student_width} columns but the teacher's {teacher_width}: pass "
            "vocab_size=aligned_vocab_size(student_width, teacher_width, len(tokenizer))"
        )
    else:
        vocab = student_width
    if teacher.mode in ("topk", "sampled"):
        values, ids = (
            (teacher.topk_logp_N_K, teacher.topk_ids_N_K)
            if teacher.mode == "topk"
            else (teacher.sampled_logp_N, teacher.sampled_ids_N)
        )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"teacher token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        for name, t in (("log-probs", values), ("tail log-mass", teacher.tail_logmass_N)):
            if t is not None and torch.isnan(t).any():
                raise ValueError(f"teacher {teacher.mode} {name} contain NaN, which would poison the loss")
    if mask_N is not None:
        if mask_N.shape != z.shape[:1]:
            raise ValueError(f"mask_N must have shape ({z.shape[0]},), got {tuple(mask_N.shape)}")
        mask_N = mask_N.to(z.device) != 0
    need_grad = z.requires_grad and torch.is_grad_enabled()  # (inside Function.forward grad mode is off)
    if overwrite and not need_grad:
        overwrite = False  # no gradient wanted: leave the logits intact
    if overwrite and not z.is_contiguous():
        raise ValueError(
            "overwrite_logits needs contiguous student logits (the gradient is written in place)"
        )
    return _Plan(z.detach(), teacher, kind, beta, vocab, mask_N, chunk_size, need_grad, overwrite)


class _TokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits_N_V, plan):
        div_N, entropy_N, ctx.grad_N_V, ctx.row_scale_N = _compute(plan, plan.need_grad)
        ctx.plan = plan
        if not plan.overwrite:  # only for a repeated backward (retain_graph=True)
            ctx.save_for_backward(student_logits_N_V)
        ctx.mark_non_differentiable(entropy_N)
        return div_N, entropy_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_div_N, _grad_entropy_N):
        grad_N_V, ctx.grad_N_V = ctx.grad_N_V, None  # scaled in place and handed to autograd: no copy
        row_scale_N = ctx.row_scale_N
        if grad_N_V is None:  # the first backward used the buffer up: recompute it
            if ctx.plan.overwrite:
                raise RuntimeError(
                    "a second backward through token_divergence(overwrite_logits=True): the logits now hold "
                    "the gradient; call it again, or use overwrite_logits=False with retain_graph=True"
                )
            ctx.plan.student_N_V = ctx.saved_tensors[0].detach()
            _, _, grad_N_V, row_scale_N = _compute(ctx.plan, need_grad=True)
        return grad_N_V.mul_((grad_div_N * row_scale_N)[:, None]), None


class _Workspace:
    """One worker's row buffers (compute dtype), reused across rows."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab, self.dtype, self.device, self.bufs = rows, vocab, dtype, device, {}

    def buf(self, name: str, n: int) -> torch.Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.empty(self.rows, self.vocab, dtype=self.dtype, device=self.device)
        return self.bufs[name][:n]


def _compute(plan: _Plan, need_grad: bool, fkl_N: torch.Tensor | None = None):
    """Per row: the divergence, the student's entropy and (need_grad) the gradient rows; ``fkl_N`` (fp32, N)
    also receives each row's forward KL(q || p) from the same pass (token selection ranks by it; not for
    the ``sampled`` signal, which has no teacher distribution)."""
    z, teacher, V = plan.student_N_V, plan.teacher, plan.vocab
    if fkl_N is not None and teacher.mode == "sampled":
        raise ValueError("the sampled teacher signal has no teacher distribution: no forward KL per token")
    (N, width), device, dtype = z.shape, z.device, plan.compute_dtype
    div_N = torch.zeros(N, dtype=dtype, device=device)
    negent_N = torch.zeros(N, dtype=dtype, device=device)  # sum p log p = -entropy
    scale_N = torch.ones(N, dtype=dtype, device=device)  # per-row factors the stored gradient rows still need
    if not need_grad:
        grad_N_V = None
    elif plan.overwrite:
        grad_N_V = z  # each row is read into the workspace before its gradient replaces it
    else:
        grad_N_V = torch.empty(z.shape, dtype=z.dtype, device=device)
    active_N = plan.mask_N
    if grad_N_V is not None:
        grad_N_V[:, V:] = 0
        if active_N is not None:
            grad_N_V[~active_N] = 0
    on_cpu = device.type == "cpu"
    if on_cpu:
        rows = min(plan.chunk_size, _CPU_ROWS)
        item_rows = min(
            plan.chunk_size, _CPU_HIDDEN_ITEM_ROWS if teacher.mode == "hidden" else _CPU_ITEM_ROWS
        )
    else:
        rows = item_rows = plan.chunk_size
    # the gradient rows double as the p_s buffer when they are contiguous rows of the compute dtype
    direct = grad_N_V is not None and z.dtype == dtype and (V == width or rows == 1)
    nan_rows: list[int] = []  # rows still NaN on the safe path (reported after all rows are done)

    def process(start: int, end: int, ws: _Workspace) -> None:
        teacher_rows = _teacher_rows(plan, start, end, device)
        for r0 in range(start, end, rows):
            r1 = min(end, r0 + rows)
            n = r1 - r0
            x = z[r0:r1, :V]
            x = ws.buf("x", n).copy_(x) if plan.overwrite or x.dtype != dtype else x
            p = grad_N_V[r0:r1, :V] if direct else ws.buf("p", n)
            out = (div_N[r0:r1], negent_N[r0:r1], scale_N[r0:r1], None if fkl_N is None else fkl_N[r0:r1])
            part = [t[r0 - start : r1 - start] for t in teacher_rows]
            if teacher.mode in ("logits", "hidden"):
                part[0] = _as_dtype(part[0], dtype, ws, "y")
            for safe in (False, True):
                # -inf logits can meet 0 * inf on the fast path: redo the rows with 0 log 0 = 0 made explicit
                if teacher.mode in ("logits", "hidden"):
                    _dense(plan.kind, plan.beta, x, part[0], p, ws, out, safe)
                elif teacher.mode == "topk":
                    _buckets(plan.kind, plan.beta, x, p, *part, out, safe)
                else:
                    _sampled(x, p, *part, out, safe)
                if not torch.isnan(out[0] + out[1]).any():
                    break
                if safe:
                    bad = torch.isnan(out[0] + out[1]).nonzero().flatten()
                    nan_rows.extend((r0 + bad).tolist())
            if grad_N_V is not None and not direct:
                grad_N_V[r0:r1, :V].copy_(p)

    items = [(a, min(b, a + item_rows)) for a, b in _runs(N, active_N) for a in range(a, b, item_rows)]
    workers = min(torch.get_num_threads(), len(items)) if on_cpu else 1
    if workers > 1:
        _run_threads(items, process, workers, lambda: _Workspace(rows, V, dtype, device))
    else:
        ws = _Workspace(rows, V, dtype, device)
        for item in items:
            process(*item, ws)

    if nan_rows:
        _raise_nan(plan, sorted(nan_rows))
    return div_N, negent_N.neg_(), grad_N_V, scale_N


def _as_dtype(t: torch.Tensor, dtype: torch.dtype, ws: _Workspace, name: str) -> torch.Tensor:
    return t if t.dtype == dtype else ws.buf(name, t.shape[0]).copy_(t)


def _runs(N: int, active_N: torch.Tensor | None) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of active rows."""
    if active_N is None:
        return [(0, N)] if N else []
    runs: list[tuple[int, int]] = []
    for r in active_N.nonzero().flatten().tolist():
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _run_threads(items, process, workers: int, new_workspace) -> None:
    todo, lock, errors = iter(items), threading.Lock(), []

    def work() -> None:
        try:
            # OpenMP/MKL counts are per thread; torch's process-wide default (read by threads that start
            # torch later) is restored below
            torch.set_num_threads(1)
            with torch.no_grad():
                ws = new_workspace()
                while not errors:
                    with lock:
                        item = next(todo, None)
                    if item is None:
                        return
                    process(*item, ws)
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)

    threads_before = torch.get_num_threads()
    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    try:
        for th in threads:
            th.start()
    finally:
        for th in threads:
            if th.ident is not None:
                th.join()
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]


def _teacher_rows(plan: _Plan, start: int, end: int, device: torch.device) -> list[torch.Tensor]:
    """The teacher's tensors for rows [start, end), on the student's device."""
    teacher, V = plan.teacher, plan.vocab
    if teacher.mode == "logits":
        return [teacher.logits_N_V[start:end, :V].to(device, non_blocking=True)]
    if teacher.mode == "hidden":
        weight = teacher.head_weight_V_H[:V].to(device, non_blocking=True)
        bias = None if teacher.head_bias_V is None else teacher.head_bias_V[:V].to(device, non_blocking=True)
        hidden = teacher.hidden_N_H[start:end].to(device, weight.dtype, non_blocking=True)
        return [torch.nn.functional.linear(hidden, weight, bias)]
    if teacher.mode == "topk":
        return [
            teacher.topk_logp_N_K[start:end].to(device, plan.compute_dtype),
            teacher.topk_ids_N_K[start:end].to(device, torch.int64),
            teacher.tail_logmass_N[start:end].to(device, plan.compute_dtype),
        ]
    return [
        teacher.sampled_ids_N[start:end].to(device, torch.int64),
        teacher.sampled_logp_N[start:end].to(device, plan.compute_dtype),
    ]


def _rowdot(a_n_v: torch.Tensor, b_n_v: torch.Tensor, out_n: torch.Tensor | None = None) -> torch.Tensor:
    """sum(a * b, -1) without an (n, V) temporary."""
    n = a_n_v.shape[0]
    if n == 1 and a_n_v.is_contiguous() and b_n_v.is_contiguous():  # the CPU case: one row at a time
        out = None if out_n is None else out_n.view(())
        return torch.dot(a_n_v.view(-1), b_n_v.view(-1), out=out).view(1)
    out = None if out_n is None else out_n.view(n, 1, 1)
    return torch.bmm(a_n_v.unsqueeze(1), b_n_v.unsqueeze(2), out=out).view(n)


def _exp_shifted(x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e = exp(x - max x) into the given buffer (torch's logsumexp would allocate a row-sized temporary);
    returns (logsumexp(x) (n,), sum(e) (n, 1))."""
    m = x.amax(-1, keepdim=True)
    torch.sub(x, m, out=e).exp_()
    total = e.sum(-1, keepdim=True)
    return m.add_(total.log()).view(-1), total


def _zero_where_no_mass(x: torch.Tensor, p: torch.Tensor, safe: bool) -> torch.Tensor:
    """x with 0 where p = 0 (0 log 0 = 0), on the safe path only."""
    return x.masked_fill(p == 0, 0.0) if safe else x


def _dense(kind, beta, x, y, e, ws, out, safe) -> None:
    """Full-vocabulary divergence of rows of student logits x and teacher logits y; e receives the gradient
    wrt x up to a per-row factor written to out[2] (applied in backward); out[3] (if not None) the forward KL.

    With D = x - y, log p - log q = D - (lse(x) - lse(y)): reverse KL = <p, D> - (lse(x) - lse(y)) with
    gradient p * (D - <p, D>), and forward KL = (lse(x) - lse(y)) - <q, D>. So for the KLs only
    exp(x - max x) = p * sum(...) is kept (normalised in backward) and no log-softmax is materialised."""
    div, negent, scale, fkl = out
    n = x.shape[0]
    if kind == "jsd":
        s, t, q = ws.buf("s", n), ws.buf("t", n), ws.buf("q", n)
        for logits, probs, logp in ((x, e, s), (y, q, t)):
            lse, total = _exp_shifted(logits, probs)
            probs.div_(total)
            torch.sub(logits, lse[:, None], out=logp)
        _rowdot(e, _zero_where_no_mass(s, e, safe), negent)
        if fkl is not None:  # <q, t> - <q, s>
            fkl.copy_(
                _rowdot(q, _zero_where_no_mass(t, q, safe)) - _rowdot(q, _zero_where_no_mass(s, q, safe))
            )
        log_m = torch.lerp(e, q, beta, out=ws.buf("m", n)).log_()  # m = (1-beta) p + beta q
        a, b = s.sub_(log_m), t.sub_(log_m)  # log p - log m, log q - log m
        if safe:
            a.masked_fill_(e == 0, 0.0)
            b.masked_fill_(q == 0, 0.0)
        kl_pm = _rowdot(e, a)
        torch.lerp(kl_pm, _rowdot(q, b), beta, out=div)  # (1-beta) KL(p||m) + beta KL(q||m)
        e.mul_(a.sub_(kl_pm[:, None]))  # p * (log p - log m - KL(p||m))
        scale.fill_(1.0 - beta)
        return
    lse_x, total_x = _exp_shifted(x, e)  # e = p * total_x
    total_x = total_x.view(-1)
    torch.sub(_rowdot(e, _zero_where_no_mass(x, e, safe)).div_(total_x), lse_x, out=negent)
    if kind == "reverse_kl":
        if fkl is None:
            lse_y, _ = _exp_shifted(y, ws.buf("d", n))  # (the buffer is only scratch here)
            D = torch.sub(x, y, out=ws.buf("d", n))
        else:  # forward KL = (lse(x) - lse(y)) - <q, D>, from q * total_y kept in its own buffer
            lse_y, total_y = _exp_shifted(y, ws.buf("q", n))
            D = torch.sub(x, y, out=ws.buf("d", n))
            q_D = _rowdot(ws.buf("q", n), _zero_where_no_mass(D, ws.buf("q", n), safe))
            torch.sub(lse_x - lse_y, q_D.div_(total_y.view(-1)), out=fkl)
        if safe:
            D.masked_fill_(e == 0, 0.0)
        pD = _rowdot(e, D).div_(total_x)
        torch.sub(pD, lse_x - lse_y, out=div)
        e.mul_(D.sub_(pD[:, None]))  # (p * total_x) * (D - <p, D>)
    else:
        q = ws.buf("q", n)
        lse_y, total_y = _exp_shifted(y, q)  # q * total_y
        D = torch.sub(x, y, out=ws.buf("d", n))
        if safe:
            D.masked_fill_(q == 0, 0.0)
        torch.sub(lse_x - lse_y, _rowdot(q, D).div_(total_y.view(-1)), out=div)
        if fkl is not None:
            fkl.copy_(div)
        e.addcmul_(q, (-total_x / total_y.view(-1))[:, None])  # (p - q) * total_x
    torch.reciprocal(total_x, out=scale)


def _bucket_grad_coef(kind, beta, P, S, T):
    """Divergence over buckets (student probs P / log-probs S, teacher log-probs T; (n, B)) and c with
    d div / d bucket-logit = P * c (for JSD without its (1-beta) factor)."""
    Q = T.exp()
    if kind == "reverse_kl":
        d = torch.where(P > 0, S - T, 0.0)
        div = (P * d).sum(-1)
        return div, d - div[:, None]
    if kind == "forward_kl":
        div = (Q * torch.where(Q > 0, T - S, 0.0)).sum(-1)
        return div, torch.where(P > 0, 1.0 - (T - S).exp(), 0.0)  # (P - Q) / P
    log_m = torch.lerp(P, Q, beta).log()
    a = torch.where(P > 0, S - log_m, 0.0)
    kl_pm = (P * a).sum(-1)
    kl_qm = (Q * torch.where(Q > 0, T - log_m, 0.0)).sum(-1)
    return torch.lerp(kl_pm, kl_qm, beta), a - kl_pm[:, None]


def _student_probs(x, p, negent, safe) -> torch.Tensor:
    """p = softmax(x); negent = sum p log p = <p, x> - lse(x); returns lse(x)."""
    lse, total = _exp_shifted(x, p)
    p.div_(total)
    torch.sub(_rowdot(p, _zero_where_no_mass(x, p, safe)), lse, out=negent)
    return lse


def _buckets(kind, beta, x, p, topk_logp, topk_ids, tail_logmass, out, safe) -> None:
    """K+1-bucket divergence of rows (teacher top-k ids + tail); p receives the gradient wrt the logits."""
    div, negent, scale, fkl = out
    K = topk_ids.shape[1]
    lse_x = _student_probs(x, p, negent, safe)
    P_k = p.gather(1, topk_ids)
    p.scatter_(1, topk_ids, 0.0)  # p now holds the tail entries only
    P = torch.cat([P_k, p.sum(-1, keepdim=True)], 1)
    S = torch.cat([x.gather(1, topk_ids) - lse_x[:, None], P[:, K:].log()], 1)
    T = torch.cat([topk_logp, tail_logmass[:, None]], 1)
    bucket_div, c = _bucket_grad_coef(kind, beta, P, S, T)
    div.copy_(bucket_div)
    if fkl is not None:
        fkl.copy_(bucket_div if kind == "forward_kl" else _bucket_grad_coef("forward_kl", beta, P, S, T)[0])
    p.mul_(c[:, K:])  # tail entries: p_j * c_tail
    p.scatter_(1, topk_ids, P_k * c[:, :K])  # top-k entries: P_k * c_k
    scale.fill_(1.0 - beta if kind == "jsd" else 1.0)


def _sampled(x, p, ids, teacher_logp, out, safe) -> None:
    """k1 = log p_s(y) - log p_t(y) per row; p receives k1 * (onehot(y) - p_s)."""
    div, negent, _, _ = out
    lse_x = _student_probs(x, p, negent, safe)
    torch.sub(x.gather(1, ids[:, None]).squeeze(1) - lse_x, teacher_logp, out=div)
    p.mul_(-div[:, None]).scatter_add_(1, ids[:, None], div[:, None])


def _raise_nan(plan: _Plan, rows: list[int]) -> None:
    """Name the culprit of rows whose divergence is NaN even on the safe path."""

    def broken(x: torch.Tensor) -> bool:  # NaN, +inf, or no finite entry at all
        return bool(torch.isnan(x).any() or (x == float("inf")).any() or (x == float("-inf")).all())

    mode = plan.teacher.mode
    device = plan.student_N_V.device
    teacher_bad = [
        r for r in rows if mode in ("logits", "hidden") and broken(_teacher_rows(plan, r, r + 1, device)[0])
    ]
    # with overwrite_logits the student rows now hold gradients: blame them when the teacher is fine
    culprit, bad = ("teacher signal", teacher_bad) if teacher_bad else ("student logits", rows)
    raise ValueError(
        f"non-finite divergence in {len(rows)} token rows: the {culprit} are NaN/+inf (or all -inf) in "
        f"{len(bad)} rows (first: row {bad[0]}), which would poison the loss; fix the model or mask those tokens"
    )
