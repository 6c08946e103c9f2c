"""The two-phase OPD step in plain torch: teacher phase, then student phase, over packed micro-batches.

Shapes: N target tokens of a micro-batch, H hidden size, V compared vocabulary (legend in
``opd.distill.head``).

It is given the modules, the optimizer and the typed config, and knows nothing of Ray or verl's worker
classes: verl's worker (``opd.distill.worker``) is a thin adapter around it (FSDP loading and offload,
dispatch, the learning-rate schedule), and ``python -m opd.bench.step`` and the tests call it directly, on
CPU or a GPU, with or without a process group.

1. ``plan_passes``: rows packed into micro-batches per mini-batch; one all-reduce gives every rank the same
   number of micro-batches per mini-batch (padding micro-batches where it has fewer), another the global
   loss normaliser of each mini-batch.
2. ``teacher_phase``: per micro-batch, the teacher's final hidden states at the target positions only (its
   output head is replaced for the forward: no per-layer states, no logits) and the configured signal on
   CPU. The head is copied once per step, inside the first forward (where FSDP has gathered it onto the
   compute device): to the device for logits/topk/sampled, to CPU once for ``hidden``.
3. ``student_phase``: per mini-batch, per micro-batch a student forward whose output head computes the
   fused output-head divergence (``opd.distill.head``), a backward, then clip and step.

Loss (the same with 1 or 64 ranks): per mini-batch m, with w_i the row's sample weight and d_n the
token divergences,
- ``token-mean``:          sum_n w_row(n) d_n / sum_n w_row(n), sums over the mini-batch's tokens on all ranks;
- ``seq-mean-token-mean``: sum_i w_i mean_i(d) / sum_i w_i, sums over its rows on all ranks.
Each rank's loss is its own share of that sum times the world size, because FSDP averages the ranks'
gradients.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import psutil
import torch

from opd.distill.batch import OPDBatch
from opd.distill.config import OPDConfig
from opd.distill.head import HeadDivergence, head_divergence, output_head_replaced
from opd.distill.packing import PackedMicroBatch, mini_batches, pack_rows, pad_to
from opd.distill.selection import (
    SUM_KEYS,
    kept_count,
    normalised_entropy,
    quadrant_metrics,
    quadrant_sums,
    select,
)
from opd.distill.teacher_signal import TeacherSignal

# (div_N, entropy_N, micro-batch, step) -> a factor per target token (0 drops it) or None (keep all)
TokenSelector = Callable[[torch.Tensor, torch.Tensor, PackedMicroBatch, int], torch.Tensor | None]


@dataclass(frozen=True)
class StepSettings:
    """The batch geometry of a step, in verl's meaning after its per-rank normalisation."""

    rows_per_mini_batch: int  # rows per optimizer step on this rank (verl: ppo_mini_batch_size * n / ranks)
    max_rows: int | None = None  # rows per micro-batch (ppo_micro_batch_size_per_gpu)
    max_tokens: int | None = None  # or tokens per micro-batch (use_dynamic_bsz: ppo_max_token_len_per_gpu)
    ppo_epochs: int = 1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if (self.max_rows is None) == (self.max_tokens is None):
            raise ValueError("StepSettings needs exactly one of max_rows and max_tokens")


class Collectives:
    """The all-reduces of the step over ``group`` (torch.distributed's default group when initialised; a
    single rank otherwise). ``ranks_average_gradients``: FSDP/DDP divide the summed gradients by the world
    size, so each rank's loss is scaled by it."""

    def __init__(self, group=None, ranks_average_gradients: bool = True):
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.group = group
        self.world_size = torch.distributed.get_world_size(group) if self.distributed else 1
        self.loss_scale = float(self.world_size) if ranks_average_gradients else 1.0

    def all_reduce(self, values: list[float], op: str, device) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if self.distributed and tensor.numel():
            reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor.tolist()


@dataclass
class StepPlan:
    """Packed micro-batches per mini-batch (equal counts on every rank) and each mini-batch's global
    normaliser (0: no target token on any rank; the optimizer step is skipped)."""

    minis: list[list[PackedMicroBatch]]
    normaliser_M: list[float]
    stats: dict[str, float] = field(default_factory=dict)
    dropped_M: list[float] = field(default_factory=list)  # this rank's share of dropped rows, per mini-batch


def _row_weights(opd: OPDBatch) -> torch.Tensor:
    return opd.sample_weight_B.float() if opd.sample_weight_B is not None else torch.ones(len(opd))


def _normaliser_weights(opd: OPDBatch, opd_config: OPDConfig) -> torch.Tensor:
    """The row weights the loss normaliser sums: the sample weights (a weighted mean), or ones with
    ``opd.sample_weighting.normalise=none`` (raw weights scale the loss)."""
    if opd_config.sample_weighting.normalise == "none":
        return torch.ones(len(opd))
    return _row_weights(opd)


def _targets_per_row(opd: OPDBatch) -> torch.Tensor:
    return opd.target_mask_B_L.sum(-1).float()


def _counted_per_row(opd: OPDBatch, opd_config: OPDConfig) -> torch.Tensor:
    """The tokens of each row the loss divides by: its targets, or the ones it keeps when the selection is
    per rollout with the kept-token normaliser (known before any pass: floor(ratio x targets), >= 1)."""
    targets_B = _targets_per_row(opd)
    sel = opd_config.token_selection
    if sel.active and sel.scope == "rollout" and sel.normalise == "kept":
        return kept_count(targets_B, sel.ratio).float()
    return targets_B


def _dropped_counts(
    opd: OPDBatch, opd_config: OPDConfig, rows_per_mini_batch: int, n_mini: int
) -> list[float]:
    """``opd.sample_weighting.normalise=none``: the rows dropped for weight 0 still count in the normaliser (the
    loss is the plain mean of w x d over every rollout, a dropped row adding zeros), per mini-batch: their
    tokens (token-mean; what token selection would count of them), or one per row (seq-mean-token-mean)."""
    counts = [0.0] * n_mini
    if opd_config.sample_weighting.normalise != "none":
        return counts
    sel = opd_config.token_selection
    for row, targets in opd.dropped_targets:
        m = row // rows_per_mini_batch
        if opd_config.loss_agg_mode != "token-mean":
            counts[m] += 1.0
        elif sel.active and sel.normalise == "kept":
            if sel.scope == "rollout":
                counts[m] += float(kept_count(torch.tensor([float(targets)]), sel.ratio)[0])
            else:
                counts[m] += sel.ratio * targets
        else:
            counts[m] += float(targets)
    return counts


def plan_passes(
    opd: OPDBatch,
    batch_rows: int,
    settings: StepSettings,
    opd_config: OPDConfig,
    collectives: Collectives | None = None,
    device="cpu",
    pad_token_id: int = 0,
) -> StepPlan:
    """Pack ``opd``'s rows (``batch_rows``: the rollout rows this rank was given, before any was dropped)."""
    collectives = collectives or Collectives()
    minis = mini_batches(
        opd,
        batch_rows,
        settings.rows_per_mini_batch,
        max_tokens=settings.max_tokens,
        max_rows=settings.max_rows,
    )
    local_counts = [float(len(micro)) for micro in minis]
    local_micro = sum(local_counts)
    # one max-reduce: the micro-batch count of every mini-batch, and the spread of the ranks' totals
    *counts, fewest_neg, most = collectives.all_reduce(
        [*local_counts, -local_micro, local_micro], "max", device
    )
    pad_to(minis, [int(c) for c in counts], pad_token_id)
    flat = [mb for micro in minis for mb in micro]
    weights_B, targets_B = _normaliser_weights(opd, opd_config), _counted_per_row(opd, opd_config)
    dropped_M = _dropped_counts(opd, opd_config, settings.rows_per_mini_batch, len(minis))
    local_norm = []
    for m, micro in enumerate(minis):
        rows = torch.cat([mb.rows_R for mb in micro])
        per_row = (
            weights_B[rows] * targets_B[rows] if opd_config.loss_agg_mode == "token-mean" else weights_B[rows]
        )
        local_norm.append(float(per_row.sum()) + dropped_M[m])
    # one sum-reduce: each mini-batch's normaliser, and the step's counts over all ranks
    *normaliser, padding, packed, logit_rows, targets = collectives.all_reduce(
        [
            *local_norm,
            float(sum(mb.padding for mb in flat)),
            float(sum(mb.num_tokens for mb in flat if not mb.padding)),
            float(sum(len(mb.target_index_N) for mb in flat if not mb.padding)),
            float(sum(mb.num_targets for mb in flat)),
        ],
        "sum",
        device,
    )
    stats = {
        "opd/micro_batches": float(len(flat)),  # per rank, padding included: the same on every rank
        "opd/padding_micro_batches": padding,  # all ranks
        "opd/packed_tokens": packed,  # all ranks
        # the output head computes one row per target token
        "opd/logit_rows_per_target_token": logit_rows / max(targets, 1.0),
        "opd/micro_batches_per_rank_min": -fewest_neg,  # before padding
        "opd/micro_batches_per_rank_max": most,
    }
    return StepPlan(minis, normaliser, stats, dropped_M)


def global_stats(
    stats: dict[str, float], collectives: Collectives, device, maxima: tuple[str, ...] = ()
) -> dict:
    """Per-rank counts summed over ranks (``maxima``: the maximum instead): verl logs rank 0's metrics."""
    keys = sorted(stats)
    summed = collectives.all_reduce([stats[k] for k in keys if k not in maxima], "sum", device)
    largest = collectives.all_reduce([stats[k] for k in keys if k in maxima], "max", device)
    out = dict(zip([k for k in keys if k not in maxima], summed, strict=True))
    out.update(zip([k for k in keys if k in maxima], largest, strict=True))
    return out


def coefficients(
    mb: PackedMicroBatch,
    opd: OPDBatch,
    normaliser: float,
    opd_config: OPDConfig,
    loss_scale: float,
    counted_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each target token's factor in the loss (module doc); 0 for a padding micro-batch. ``counted_B``: the
    tokens each row's mean divides by (default ``_counted_per_row``)."""
    if mb.padding or normaliser == 0:
        return torch.zeros(len(mb.target_index_N))
    coef_N = _row_weights(opd)[mb.token_row_N]
    if opd_config.loss_agg_mode == "seq-mean-token-mean":
        counted_B = _counted_per_row(opd, opd_config) if counted_B is None else counted_B
        coef_N = coef_N / counted_B[mb.token_row_N].clamp(min=1.0)
    return coef_N * (loss_scale / normaliser)


@contextmanager
def measure(name: str, metrics: dict, device):
    """Wall time and memory of a phase: the device's peak on GPU, the growth of the resident set on CPU
    (``python -m opd.bench.step`` measures the CPU peak itself)."""
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    yield
    if on_gpu:
        torch.cuda.synchronize(device)
    metrics[f"opd/{name}_seconds"] = time.perf_counter() - start
    if on_gpu:
        metrics[f"opd/{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        metrics[f"opd/{name}_rss_delta_gb"] = (psutil.Process().memory_info().rss - rss_before) / 2**30


@dataclass
class TeacherOutput:
    """Phase 1's result: a signal per micro-batch (CPU) and, for ``hidden``, the teacher's head once."""

    signals: list[list[TeacherSignal]]
    head_weight_V_H: torch.Tensor | None = None
    head_bias_V: torch.Tensor | None = None

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the per-token tensors, bytes of the head kept once)."""
        per_token = sum(s.nbytes_per_token() * s.num_tokens for micro in self.signals for s in micro)
        head = sum(
            t.numel() * t.element_size() for t in (self.head_weight_V_H, self.head_bias_V) if t is not None
        )
        return per_token, head


@torch.no_grad()
def teacher_phase(
    teacher: torch.nn.Module,
    plan: StepPlan,
    opd_config: OPDConfig,
    device,
    teacher_rows: OPDBatch | None = None,
) -> TeacherOutput:
    """Phase 1 (module doc): every micro-batch's teacher signal, on CPU. ``teacher_rows``: the teacher's own
    rows (its prompts carry privileged context, ``opd.teacher_context``); each micro-batch's rows are packed
    from them in the same order, so the teacher scores the same target tokens in the same order."""
    teacher.eval()
    mode, vocab = opd_config.teacher_signal, opd_config.vocab_size
    head: dict[str, torch.Tensor | None] = {}

    def final_hidden(module, hidden_1_N_H):
        if (
            "weight" not in head
        ):  # once per step, inside the forward: FSDP has the full head on the compute device here
            weight = module.weight[:vocab] if vocab else module.weight
            bias = None if module.bias is None else (module.bias[:vocab] if vocab else module.bias)
            keep = "cpu" if mode == "hidden" else hidden_1_N_H.device
            head["weight"] = weight.detach().to(keep, copy=True)
            head["bias"] = None if bias is None else bias.detach().to(keep, copy=True)
        head["hidden"] = hidden_1_N_H[0]
        return hidden_1_N_H.new_zeros(())

    signals = []
    for micro in plan.minis:
        signals.append([])
        for mb in micro:
            seen = mb if teacher_rows is None or mb.padding else pack_rows(teacher_rows, mb.rows_R.tolist())
            if not torch.equal(seen.target_ids_N, mb.target_ids_N):
                raise RuntimeError("the teacher's rows do not end in the student's response tokens")
            with output_head_replaced(teacher, final_hidden):
                teacher(**seen.model_inputs(device))
            hidden_N_H = head.pop("hidden")
            if mode == "hidden":
                signal = TeacherSignal(
                    "hidden",
                    hidden_N_H=hidden_N_H.to("cpu", torch.bfloat16),
                    head_weight_V_H=head["weight"],
                    head_bias_V=head["bias"],
                )
            else:
                signal = TeacherSignal.from_hidden(
                    hidden_N_H,
                    head["weight"],
                    head["bias"],
                    mode=mode,
                    k=opd_config.topk,
                    sampled_ids_N=mb.target_ids_N.to(hidden_N_H.device),
                    chunk_size=opd_config.chunk_size,
                    device="cpu",
                )
            signals[-1].append(signal)
    if mode == "hidden":
        return TeacherOutput(signals, head["weight"], head["bias"])
    return TeacherOutput(signals)  # the device copy of the head is freed with `head`


def _on_device(signal: TeacherSignal, head_weight, head_bias, device) -> TeacherSignal:
    """The micro-batch's signal on the device; a ``hidden`` signal points at the head uploaded once."""
    if signal.mode != "hidden":
        return signal.to(device)
    return TeacherSignal(
        "hidden", hidden_N_H=signal.hidden_N_H.to(device), head_weight_V_H=head_weight, head_bias_V=head_bias
    )


def default_clip_and_step(module: torch.nn.Module, optimizer, max_norm: float) -> float:
    """Clip the gradient norm and step; a non-finite norm skips the step (it would poison the weights)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=max_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    else:
        optimizer.zero_grad()
    return float(grad_norm)


def student_phase(
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: StepPlan,
    teacher_out: TeacherOutput,
    opd: OPDBatch,
    opd_config: OPDConfig,
    settings: StepSettings,
    device,
    *,
    loss_type: str | None = None,
    step: int = 0,
    collectives: Collectives | None = None,
    clip_and_step: Callable[[], float] | None = None,
    select_tokens: TokenSelector | None = None,
) -> dict[str, float]:
    """Phase 2 (module doc): ``ppo_epochs`` passes over the mini-batches, one optimizer step each. The
    teacher signal serves every pass: it depends on the rollout tokens only.

    Token selection (``opd.token_selection``, ``opd.distill.selection``): per rollout, the output head
    ranks each row's tokens (in one pass per chunk of whole rows for divergence-ranked rules, else a
    scoring pass first) and runs the gradient for kept tokens only; per mini-batch, a no-grad scoring
    forward of the mini-batch's micro-batches comes first. ``select_tokens`` (a worker hook) replaces the
    configured rule with its own factors."""
    collectives = collectives or Collectives()
    loss_type = loss_type or opd_config.loss_type
    clip_and_step = clip_and_step or (lambda: default_clip_and_step(student, optimizer, settings.grad_clip))
    sel = opd_config.token_selection
    vocab = opd_config.vocab_size or student.get_output_embeddings().weight.shape[0]
    student.train()
    head_weight = None if teacher_out.head_weight_V_H is None else teacher_out.head_weight_V_H.to(device)
    head_bias = None if teacher_out.head_bias_V is None else teacher_out.head_bias_V.to(device)
    totals = {"div": 0.0, "entropy": 0.0, "div_tokens": 0, "entropy_tokens": 0}
    quadrants: dict[str, float] = {}
    pairs: list[torch.Tensor] = []
    grad_norms, epoch_sums, skipped = [], [], 0
    for epoch in range(settings.ppo_epochs):
        div_before, tokens_before = totals["div"], totals["div_tokens"]
        for m, micro in enumerate(plan.minis):
            optimizer.zero_grad()
            # moved to the device one micro-batch at a time (a logits signal is tokens x V)
            signals = [
                functools.partial(_on_device, signal, head_weight, head_bias, device)
                for signal in teacher_out.signals[m]
            ]
            normaliser, counted_B, scored = plan.normaliser_M[m], None, None
            if sel.active and sel.scope == "mini_batch" and select_tokens is None:
                scored, kept_normaliser, counted_B = _score_mini_batch(
                    student,
                    micro,
                    signals,
                    opd,
                    opd_config,
                    loss_type,
                    vocab,
                    step,
                    epoch,
                    collectives,
                    device,
                    plan.dropped_M[m] if plan.dropped_M else 0.0,
                )
                normaliser = normaliser if kept_normaliser is None else kept_normaliser
            for i, (mb, signal) in enumerate(zip(micro, signals, strict=True)):
                coef_N = coefficients(mb, opd, normaliser, opd_config, collectives.loss_scale, counted_B)
                select = None
                if mb.padding:
                    pass
                elif select_tokens is not None:
                    select = functools.partial(_select_in, select_tokens, mb=mb, step=step)
                elif scored is not None:
                    coef_N = coef_N.to(device) * scored[i].selected_N.to(device)
                elif sel.active:
                    select = functools.partial(
                        _configured_rule, opd_config, vocab, mb, _generator(sel.seed, step, epoch, mb)
                    )
                r = _micro_step(
                    student,
                    mb,
                    signal(),
                    coef_N.to(device),
                    select,
                    loss_type,
                    opd_config,
                    device,
                    skip_zero_coef=scored is not None,
                    score=sel.score if select is not None and select_tokens is None else "full",
                    # the configured rule ranks each row among its own tokens: chunks of whole rows may be
                    # scored and updated in one pass (a custom hook sees the whole micro-batch)
                    group_N=mb.token_row_N if select is not None and select_tokens is None else None,
                )
                if mb.padding:
                    continue
                if (
                    scored is not None
                ):  # the gradient pass computed the kept tokens, the scoring pass the rest
                    s = scored[i]
                    kept_N = s.selected_N > 0
                    div_N = torch.where(kept_N, r.div_N, s.div_N)
                    entropy_N = torch.where(kept_N, r.entropy_N, s.entropy_N)
                    score = s.score
                else:
                    kept_N = (
                        torch.ones_like(r.div_N, dtype=torch.bool)
                        if r.selected_N is None
                        else r.selected_N > 0
                    )
                    div_N, entropy_N, score = r.div_N, r.entropy_N, r.score
                # what is known of every token: the scoring pass's values, and both values of kept tokens
                div_known = kept_N if score != "full" else torch.ones_like(kept_N)
                entropy_known = kept_N if score == "none" else torch.ones_like(kept_N)
                totals["div"] += float(div_N[div_known].sum())
                totals["div_tokens"] += int(div_known.sum())
                totals["entropy"] += float(entropy_N[entropy_known].sum())
                totals["entropy_tokens"] += int(entropy_known.sum())
                if epoch == 0:  # the rows as the rollout left them
                    h_N = normalised_entropy(entropy_N, vocab)
                    for key, value in quadrant_sums(
                        h_N, div_N, kept_N, sel.entropy_threshold, sel.divergence_threshold, score
                    ).items():
                        quadrants[key] = quadrants.get(key, 0.0) + value
                    if sel.sample_pairs:
                        triples = torch.stack([h_N, div_N, kept_N.float()], 1)[div_known & entropy_known]
                        pairs.append(_sample(triples, sel, step, mb))
            if normaliser == 0:  # no target token on any rank: nothing to learn, no step
                skipped += 1
                continue
            grad_norms.append(clip_and_step())
        epoch_sums += [totals["div"] - div_before, totals["div_tokens"] - tokens_before]
    # token means over all ranks (verl logs rank 0's metrics)
    keys = list(SUM_KEYS)  # the same list on every rank, whether or not it had tokens
    entropy, entropy_tokens, *rest = collectives.all_reduce(
        [totals["entropy"], totals["entropy_tokens"], *[quadrants.get(k, 0.0) for k in keys], *epoch_sums],
        "sum",
        device,
    )
    quadrant_totals, epoch_sums = dict(zip(keys, rest[: len(keys)], strict=True)), rest[len(keys) :]
    epoch_divergence = [d / max(n, 1) for d, n in zip(epoch_sums[::2], epoch_sums[1::2], strict=True)]
    n_tokens = max(sum(epoch_sums[1::2]), 1)
    divergence = sum(epoch_sums[::2]) / n_tokens
    metrics = {
        # over the tokens whose divergence is known: every token, unless an entropy/random rule left the
        # dropped ones unscored (then the kept ones; opd.token_selection.full_diagnostics scores all)
        "opd/divergence": divergence,
        # the same value under the divergence actually optimised, so a run can show which one it was
        f"opd/divergence/{loss_type}": divergence,
        # the same rows before and after this step's updates (ppo_epochs > 1): did the updates move the
        # student toward the teacher?
        "opd/divergence_first_epoch": epoch_divergence[0],
        "opd/divergence_last_epoch": epoch_divergence[-1],
        "opd/optimizer_steps": float(len(grad_norms)),
        "opd/optimizer_steps_skipped_empty": float(skipped),
        "actor/entropy": entropy / max(entropy_tokens, 1),  # replaces verl's (skipped) old-log-prob pass
        "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),  # the global norm (FSDP clips globally)
    }
    metrics.update(quadrant_metrics(quadrant_totals))
    if sel.sample_pairs:  # a list, not a scalar: every rank sends one (verl gathers each key from all ranks)
        metrics["token_pairs"] = _sample(torch.cat(pairs), sel, step, None).tolist() if pairs else []
    return metrics


def _generator(seed: int, step: int, epoch: int, mb: PackedMicroBatch | None) -> torch.Generator:
    """Draws that depend on the seed, the step, the epoch and the rows only (not on timing or rank order)."""
    first_row = int(mb.rows_R[0]) if mb is not None and len(mb.rows_R) else -1
    return torch.Generator().manual_seed(hash((seed, step, epoch, first_row)) % 2**63)


def _sample(rows_P_3: torch.Tensor, sel, step: int, mb: PackedMicroBatch | None) -> torch.Tensor:
    """At most ``sel.sample_pairs`` rows, drawn uniformly."""
    if rows_P_3.shape[0] <= sel.sample_pairs:
        return rows_P_3.cpu()
    pick = torch.randperm(rows_P_3.shape[0], generator=_generator(sel.seed, step, -1, mb))[: sel.sample_pairs]
    return rows_P_3.cpu()[pick]


def _configured_rule(opd_config, vocab, mb, generator, div_N, entropy_N, fkl_N, group_N=None) -> torch.Tensor:
    """``opd.token_selection``'s rule per rollout: each row (of the micro-batch, or of the chunk of whole
    rows it is called with) keeps its top tokens."""
    sel = opd_config.token_selection
    group_N = (mb.token_row_N if group_N is None else group_N).to(div_N.device)
    return select(sel, entropy_N, div_N, fkl_N, vocab, group_N=group_N, generator=generator).float()


def _select_in(
    select_tokens: TokenSelector, div_N, entropy_N, fkl_N, _group_N, *, mb: PackedMicroBatch, step: int
):
    return select_tokens(div_N, entropy_N, mb, step)


def _score_mini_batch(
    student, micro, signals, opd, opd_config, loss_type, vocab, step, epoch, collectives, device, dropped=0.0
):
    """``mini_batch`` scope: a no-grad forward of every micro-batch scores its tokens; this rank's
    mini-batch keeps its top floor(ratio x tokens). Returns each micro-batch's scores (``selected_N``: the
    kept tokens, 1/0), the mini-batch's global normaliser and the kept tokens per row (for
    seq-mean-token-mean)."""
    sel = opd_config.token_selection
    scored = []
    with torch.no_grad():
        for mb, signal in zip(micro, signals, strict=True):
            if mb.padding:
                scored.append(None)
            elif sel.score == "none":  # a rule that needs no values (random): no scoring forward
                zeros_N = torch.zeros(mb.num_targets, device=device)
                scored.append(HeadDivergence(zeros_N.sum(), zeros_N, zeros_N.clone(), None, None, "none"))
            else:
                scored.append(
                    _micro_step(
                        student,
                        mb,
                        signal(),
                        None,
                        None,
                        loss_type,
                        opd_config,
                        device,
                        want_fkl=sel.rule == "q3",
                        score=sel.score,
                    )
                )
    real = [r for r in scored if r is not None]
    weights_B, counted_B = _normaliser_weights(opd, opd_config), torch.zeros(len(opd))
    local = 0.0
    if real:
        fkl = [r.fkl_N for r in real] if sel.rule == "q3" else None
        kept_N = select(
            sel,
            torch.cat([r.entropy_N for r in real]),
            torch.cat([r.div_N for r in real]),
            None if fkl is None else torch.cat(fkl),
            vocab,
            generator=_generator(sel.seed, step, epoch, micro[0]),
        )
        rows_N = torch.cat([mb.token_row_N for mb in micro if not mb.padding])
        counted_B.index_add_(0, rows_N, kept_N.float().cpu())
        offsets = 0
        for r in real:
            r.selected_N = kept_N[offsets : offsets + len(r.div_N)].float()
            offsets += len(r.div_N)
        if sel.normalise == "kept":
            if opd_config.loss_agg_mode == "token-mean":
                local = float(weights_B[rows_N.cpu()][kept_N.cpu()].sum())
            else:
                local = float(weights_B[counted_B > 0].sum())
    if sel.normalise == "kept":
        (normaliser,) = collectives.all_reduce([local + dropped], "sum", device)
    else:
        normaliser, counted_B = None, None
    for i, r in enumerate(scored):
        if r is None:
            scored[i] = HeadDivergence(torch.zeros(()), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    return scored, normaliser, counted_B


def _micro_step(
    student,
    mb,
    signal,
    coef_N,
    select,
    loss_type,
    opd_config,
    device,
    *,
    skip_zero_coef=False,
    want_fkl=None,
    score="full",
    group_N=None,
) -> HeadDivergence:
    """One student forward whose output head computes the fused divergence, and its backward (none under
    ``torch.no_grad``: a scoring forward)."""
    result = {}
    sel = opd_config.token_selection
    want_fkl = (sel.rule == "q3" and select is not None) if want_fkl is None else want_fkl

    def fused(head, hidden_1_N_H):
        result["r"] = head_divergence(
            hidden_1_N_H[0],
            head.weight,
            head.bias,
            signal,
            loss_type,
            coef_N=coef_N,
            select=select,
            want_fkl=want_fkl,
            skip_zero_coef=skip_zero_coef,
            score=score,
            group_N=group_N,
            beta=opd_config.beta,
            chunk_size=opd_config.chunk_size,
            vocab_size=opd_config.vocab_size,
        )
        return result["r"].loss

    with output_head_replaced(student, fused):
        loss = student(**mb.model_inputs(device)).logits
    if torch.is_grad_enabled():
        loss.backward()
    return result["r"]


# batch stats that are a maximum over ranks, not a sum
_MAXIMUM_STATS = ("opd/padded_width", "opd/prompt_source_raw")


def run_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    opd: OPDBatch,
    opd_config: OPDConfig,
    settings: StepSettings,
    device="cpu",
    *,
    batch_rows: int | None = None,
    collectives: Collectives | None = None,
    pad_token_id: int = 0,
    student_on_device: Callable[[], AbstractContextManager] = nullcontext,
    **student_kwargs,
) -> dict[str, float]:
    """Both phases: plan, teacher phase, student phase. ``student_on_device`` wraps the student phase (verl's
    worker loads the offloaded student and its optimizer there). Returns the step's metrics."""
    collectives = collectives or Collectives()
    metrics = global_stats(opd.stats, collectives, device, _MAXIMUM_STATS)  # the rows of all ranks
    plan = plan_passes(
        opd,
        batch_rows if batch_rows is not None else len(opd),
        settings,
        opd_config,
        collectives,
        device,
        pad_token_id,
    )
    metrics.update(plan.stats)
    with measure("teacher", metrics, device):
        teacher_out = teacher_phase(teacher, plan, opd_config, device, opd.teacher_rows)
    metrics.update(signal_metrics(teacher_out))
    with measure("student", metrics, device), student_on_device():
        metrics.update(
            student_phase(
                student,
                optimizer,
                plan,
                teacher_out,
                opd,
                opd_config,
                settings,
                device,
                collectives=collectives,
                **student_kwargs,
            )
        )
    return metrics


def signal_metrics(teacher_out: TeacherOutput) -> dict[str, float]:
    per_token, head = teacher_out.nbytes()
    n_tokens = sum(s.num_tokens for micro in teacher_out.signals for s in micro)
    return {
        # which signal the teacher sent, in its own unit (logits 2V, hidden 2H, topk 8K+4, sampled 8)
        "opd/teacher_signal_bytes_per_token": per_token / max(n_tokens, 1),
        "opd/teacher_head_mb": head / 2**20,  # hidden: the head, kept once per step
        "opd/teacher_signal_mb": (per_token + head) / 2**20,
    }
