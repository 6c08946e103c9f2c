"""python -m opd.bench.tip [--rows 8] [--rules entropy,soft_or,q3,random] [--ratios 0.5,0.2] [--out outputs/bench/tip.json]

Benchmarks token selection (``opd.token_selection``) in the real OPD step at Qwen's vocabulary
(V=151,936; the model pair, rows and lengths of ``python -m opd.bench.step``): every token (``all``) and
each rule at each kept fraction. Needs torch and transformers only, so it runs on a GPU machine too.

Each configuration runs in a fresh process: models, batch, AdamW and the teacher phase, one warm-up step,
then the measured student phase; then its parts, each warmed up once and measured on the student's final
hidden states of every micro-batch (the step's packing and teacher signal):
- ``transformer``: the student's forward and backward with a stand-in loss on the final hidden states
  (what every token still costs, kept or not; measured in the ``all`` configuration);
- ``scoring``: the step's no-grad pass over the output head for entropy/random rules (the student's
  entropy only; nothing for random); divergence-ranked rules score inside the fused pass (``fused``);
- ``kept part``: the output head, the divergence and their backward for the kept tokens (every token for
  ``all``): the part that selection shrinks.
Time is wall time; peak is memory above what was resident when the part began (CPU: the resident set's
high-water mark; CUDA: ``max_memory_allocated``).

The kept part's peak includes the head's gradient (W x H, the same in every configuration: it exists on
any path), so it is also reported above that gradient. Why the kept part's peak may not shrink at all: the fused head works ``chunk_size`` target tokens at a time, so
its transient memory is about chunk x V, whatever the number of tokens above it; selection cuts it only
when a micro-batch's tokens fit in fewer rows than a chunk (the default chunk_size 1024 and ~4 rows of a
few hundred tokens per micro-batch here). Prints a table with ratios to ``all`` and writes JSON.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch

from opd.bench import run_child
from opd.bench.step import (
    VOCAB,
    _gib,
    _phase,
    build_models,
    opd_batch,
    parse_step_args,
    report_checks,
    row_lengths,
    step_arguments,
)
from opd.distill.config import OPDConfig, TokenSelection
from opd.distill.head import head_divergence, output_head_replaced
from opd.distill.selection import select
from opd.distill.step import (
    StepSettings,
    _on_device,
    coefficients,
    plan_passes,
    student_phase,
    teacher_phase,
)

# acceptance: the kept part's cost (time and peak) relative to every token's, at each kept fraction
TARGETS = {0.5: 0.6, 0.2: 0.3}
NOISE = 0.03  # tolerance for the noise of a single measurement on a shared machine


def run_config(args, rule: str, ratio: float) -> dict:
    device = torch.device(args.device)
    student, teacher = build_models(args, device, getattr(torch, args.dtype))
    opd = opd_batch(row_lengths(args), args.seed)
    selection = TokenSelection() if rule == "all" else TokenSelection(rule=rule, ratio=ratio)
    config = OPDConfig(
        loss_type=args.loss_type,
        teacher_signal=args.signal,
        chunk_size=args.chunk_size,
        vocab_size=VOCAB,
        token_selection=selection,
    )
    settings = StepSettings(rows_per_mini_batch=args.rows, max_rows=args.micro_rows, grad_clip=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    plan = plan_passes(opd, len(opd), settings, config, device=device)
    teacher_out = teacher_phase(teacher, plan, config, device)
    out: dict = {"rule": rule, "ratio": ratio, "target_tokens": int(opd.target_mask_B_L.sum())}
    for measure in (False, True):  # the warm-up allocates gradients and AdamW state: "state" from here on
        gc.collect()
        with _phase(out, "phase", device, measure):
            metrics = student_phase(student, optimizer, plan, teacher_out, opd, config, settings, device)
    out["kept_fraction"] = metrics["opd/selected_token_fraction"]

    micro = [mb for mini in plan.minis for mb in mini]
    signals = [
        _on_device(s, teacher_out.head_weight_V_H, teacher_out.head_bias_V, device)
        for mini in teacher_out.signals
        for s in mini
    ]
    hidden = [_final_hidden(student, mb, device) for mb in micro]
    weight = student.get_output_embeddings().weight.detach()
    for measure in (False, True):
        if rule == "all":
            gc.collect()
            with _phase(out, "transformer", device, measure):
                for mb in micro:
                    _transformer_pass(student, mb, device)
        masks = [None] * len(micro)
        if rule != "all":  # the kept tokens, from every token's values (a full scoring pass, not measured)
            with torch.no_grad():
                for i, (mb, h, signal) in enumerate(zip(micro, hidden, signals, strict=True)):
                    r = head_divergence(
                        h,
                        weight,
                        None,
                        signal,
                        config.loss_type,
                        want_fkl=rule == "q3",
                        chunk_size=args.chunk_size,
                    )
                    group = mb.token_row_N.to(device)
                    masks[i] = select(selection, r.entropy_N, r.div_N, r.fkl_N, VOCAB, group_N=group).float()
        if selection.score in ("entropy", "none") and rule != "all":  # the step's own scoring pass
            gc.collect()
            with _phase(out, "scoring", device, measure), torch.no_grad():
                for h, signal in zip(hidden, signals, strict=True):
                    if selection.score == "entropy":
                        head_divergence(
                            h,
                            weight,
                            None,
                            signal,
                            config.loss_type,
                            score="entropy",
                            chunk_size=args.chunk_size,
                        )
        leaves = [(h.clone().requires_grad_(), weight.clone().requires_grad_()) for h in hidden]
        gc.collect()
        with _phase(out, "kept", device, measure):
            for mb, (leaf, head), signal, mask in zip(micro, leaves, signals, masks, strict=True):
                coef_N = coefficients(mb, opd, 1.0, config, 1.0).to(device)
                r = head_divergence(
                    leaf,
                    head,
                    None,
                    signal,
                    config.loss_type,
                    coef_N=coef_N if mask is None else coef_N * mask,
                    skip_zero_coef=mask is not None,
                    chunk_size=args.chunk_size,
                )
                r.loss.backward()
                leaf.grad = head.grad = None
                del r
        del leaves
    # the head's gradient (W x H) exists in every configuration, whatever is kept
    out["head_grad_bytes"] = weight.numel() * weight.element_size()
    return out


def _final_hidden(student, mb, device) -> torch.Tensor:
    """The student's final hidden states at the micro-batch's target positions (no grad)."""
    captured = {}

    def keep(_head, hidden_1_N_H):
        captured["h"] = hidden_1_N_H[0].detach()
        return hidden_1_N_H.new_zeros(())

    with torch.no_grad(), output_head_replaced(student, keep):
        student(**mb.model_inputs(device))
    return captured["h"]


def _transformer_pass(student, mb, device) -> None:
    """Forward and backward of the transformer alone: a stand-in loss on the final hidden states."""

    def stand_in(_head, hidden_1_N_H):
        return hidden_1_N_H.float().square().mean()

    with output_head_replaced(student, stand_in):
        loss = student(**mb.model_inputs(device)).logits
    loss.backward()
    student.zero_grad(set_to_none=False)


def parse(argv):
    parser = step_arguments(
        "python -m opd.bench.tip",
        __doc__.split("\n\n")[1],
        rows=8,
        chunk_size=1024,
        chunk_help="opd.chunk_size (the trainer's default)",
        out="outputs/bench/tip.json",
    )
    parser.add_argument("--rules", default="entropy,soft_or,q3,random")
    parser.add_argument("--ratios", default="0.5,0.2")
    return parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        rule, ratio = args.child.split(":")
        print(json.dumps(run_config(args, rule, float(ratio))))
        return 0
    lengths = row_lengths(args)
    ratios = [float(r) for r in args.ratios.split(",")]
    configs = [("all", 1.0)] + [(rule, r) for r in ratios for rule in args.rules.split(",")]
    print(
        f"opd.bench.tip on {args.device} ({args.dtype}): V={VOCAB}, student H={args.student_hidden}, teacher "
        f"H={args.teacher_hidden}, {args.layers} layers; {args.rows} rows ({sum(r for _, r in lengths)} target "
        f"tokens), {args.micro_rows} per micro-batch, chunk_size {args.chunk_size}; {args.loss_type} from "
        f"'{args.signal}'",
        flush=True,
    )
    results = []
    for rule, ratio in configs:
        start = time.perf_counter()
        results.append(run_child("opd.bench.tip", [*argv, "--child", f"{rule}:{ratio}"]))
        print(f"  {rule} {ratio}: {time.perf_counter() - start:.0f} s", flush=True)
    base = results[0]
    print(
        f"\ntransformer forward+backward (every token, every rule): {base['transformer_s']:.2f} s, peak "
        f"{_gib(base['transformer_peak_bytes'])}; the whole phase with every token: {base['phase_s']:.2f} s, "
        f"peak {_gib(base['phase_peak_bytes'])}; the head part's share of it: "
        f"{base['kept_s'] / base['phase_s']:.0%} of the time\n"
    )
    header = ["rule", "ratio", "kept", "phase s", "x all", "phase peak", "x all", "scoring s"]
    header += ["kept part s", "x all", "kept part peak", "x all", "above head grad", "x all"]
    for r in results:  # the kept part's transient beyond the head's gradient (W x H, fixed)
        r["kept_above_head_grad_bytes"] = r["kept_peak_bytes"] - r["head_grad_bytes"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    checks = {}
    for r in results:
        keys = ("phase_s", "phase_peak_bytes", "kept_s", "kept_peak_bytes", "kept_above_head_grad_bytes")
        rel = {k: r[k] / base[k] for k in keys}
        r["relative_to_all"] = rel
        cells = [
            r["rule"],
            f"{r['ratio']:.1f}",
            f"{r['kept_fraction']:.3f}",
            f"{r['phase_s']:.2f}",
            f"{rel['phase_s']:.2f}",
            _gib(r["phase_peak_bytes"]),
            f"{rel['phase_peak_bytes']:.2f}",
            f"{r['scoring_s']:.2f}" if "scoring_s" in r else ("-" if r["rule"] == "all" else "fused"),
            f"{r['kept_s']:.2f}",
            f"{rel['kept_s']:.2f}",
            _gib(r["kept_peak_bytes"]),
            f"{rel['kept_peak_bytes']:.2f}",
            _gib(r["kept_above_head_grad_bytes"]),
            f"{rel['kept_above_head_grad_bytes']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
        if r["rule"] == "all":
            continue
        name = f"{r['rule']} {r['ratio']}"
        if r["ratio"] in TARGETS:
            target = TARGETS[r["ratio"]]
            checks[f"{name}: kept part time <= {target}x all ({rel['kept_s']:.2f})"] = rel["kept_s"] <= target
            above = rel["kept_above_head_grad_bytes"]
            checks[f"{name}: kept part peak above the head's gradient <= {target}x all ({above:.2f})"] = (
                above <= target
            )
        # "never more than every token", within the noise of one measurement (the fused path runs a subset
        # of the all-token work, so equal is the expected worst case)
        tolerance = 1.0 + NOISE
        checks[f"{name}: phase time <= all ({rel['phase_s']:.2f})"] = rel["phase_s"] <= tolerance
        checks[f"{name}: phase peak <= all ({rel['phase_peak_bytes']:.2f})"] = (
            rel["phase_peak_bytes"] <= tolerance
        )
    print()
    return report_checks(args, lengths, results, checks)


if __name__ == "__main__":
    sys.exit(main())
