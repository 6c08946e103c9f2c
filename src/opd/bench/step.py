"""python -m opd.bench.step [--rows 8] [--micro-rows 4] [--device auto|cpu|cuda] [--out outputs/bench/step.json]

Benchmarks one OPD step, ``opd.distill.step`` (packed micro-batches, the fused output-head divergence)
against the padded step it replaced (``opd.bench.padded``), on a model pair built offline at Qwen's
vocabulary (V=151,936): a student with a tied head and a teacher with an untied head padded to 152,064
rows, a few layers each, and a batch of rollout rows whose lengths are drawn like math responses (short
prompts, long-tailed responses). Needs torch and transformers only (no Ray, no verl), so it runs on a
GPU machine too.

Each path runs in a fresh process: models, batch and AdamW are built, one warm-up step allocates the
gradients and the optimizer state, then one measured step reports per phase:
- wall time;
- peak memory above what was resident when the phase began (models, gradients and optimizer state):
  on CPU the kernel's high-water mark of the resident set (reset by /proc/self/clear_refs), on CUDA
  ``torch.cuda.max_memory_allocated()``;
- logit rows per target token (rows of the output head's result; 1.00 = target tokens only).
A third process runs the teacher phase alone for every teacher signal and reports its host bytes per
token and the bytes of the head it keeps (distinct storages, so a head referenced by every micro-batch
counts once).

Prints a table with the ratios new/padded and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from opd.bench import run_child
from opd.bench.loss import PeakMemory
from opd.bench.padded import padded_micro_batches, padded_mini_batch_backward, padded_teacher_signals
from opd.distill.batch import OPDBatch
from opd.distill.config import SIGNALS, OPDConfig
from opd.distill.step import (
    StepSettings,
    default_clip_and_step,
    plan_passes,
    student_phase,
    teacher_phase,
)

VOCAB = 151_936  # Qwen2/2.5/3's tokenizer
TEACHER_WIDTH = 152_064  # Qwen2.5-7B's padded head
TARGET_MEMORY_RATIO = 0.25  # acceptance: the student phase's peak above state, new / padded


def build_models(args, device, dtype):
    """(student, teacher): Qwen2 at the real vocabulary, random weights drawn wide enough that the two
    distributions are peaked and differ."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build(width, hidden, tied, seed):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=width,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 256),
            tie_word_embeddings=tied,
            attn_implementation="sdpa",
            initializer_range=0.05,
            max_position_embeddings=32_768,
        )
        return Qwen2ForCausalLM(config).to(device, dtype)

    return build(VOCAB, args.student_hidden, True, 1), build(TEACHER_WIDTH, args.teacher_hidden, False, 2)


def row_lengths(args) -> list[tuple[int, int]]:
    """(prompt, response) tokens per row: prompts uniform in [48, 200], responses log-normal around the
    median with a long tail (sigma 0.9), clipped to [16, --response-max], like math rollouts."""
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(args.rows):
        prompt = int(torch.randint(48, 201, (1,), generator=gen))
        z = float(torch.randn(1, generator=gen))
        response = int(min(args.response_max, max(16, round(args.response_median * math.exp(0.9 * z)))))
        out.append((prompt, response))
    return out


def opd_batch(lengths: list[tuple[int, int]], seed: int) -> OPDBatch:
    """Right-padded rows as ``build_opd_batch`` lays them out (every response token a target)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in lengths)
    n = len(lengths)
    input_ids = torch.zeros(n, width, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.long)
    target = torch.zeros(n, width, dtype=torch.bool)
    for i, (p, r) in enumerate(lengths):
        input_ids[i, : p + r] = torch.randint(7, VOCAB, (p + r,), generator=gen)
        attention[i, : p + r] = 1
        target[i, p : p + r] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    prompts = torch.tensor([p for p, _ in lengths])
    return OPDBatch(
        input_ids,
        attention,
        positions,
        target,
        prompts,
        list(range(n)),
        None,
        None,
        {"opd/target_tokens": float(target.sum())},
    )


def run_path(args, path: str) -> dict:
    """One path (``packed`` or ``padded``), in this process: a warm-up step, then the measured one."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    student, teacher = build_models(args, device, dtype)
    opd = opd_batch(row_lengths(args), args.seed)
    config = OPDConfig(
        loss_type=args.loss_type, teacher_signal=args.signal, chunk_size=args.chunk_size, vocab_size=VOCAB
    )
    settings = StepSettings(rows_per_mini_batch=args.rows, max_rows=args.micro_rows, grad_clip=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    n_targets = int(opd.target_mask_B_L.sum())
    result: dict = {"path": path, "target_tokens": n_targets}

    def step(measure: bool):
        phases = {}
        if path == "packed":
            plan = plan_passes(opd, len(opd), settings, config, device=device)
            with _phase(phases, "teacher", device, measure):
                teacher_out = teacher_phase(teacher, plan, config, device)
            with _phase(phases, "student", device, measure):
                student_phase(student, optimizer, plan, teacher_out, opd, config, settings, device)
            rows = sum(len(mb.target_index_N) for micro in plan.minis for mb in micro)
        else:
            micro = padded_micro_batches(opd, args.micro_rows, device)
            with _phase(phases, "teacher", device, measure):
                signals = padded_teacher_signals(teacher, micro, config)
            with _phase(phases, "student", device, measure):
                optimizer.zero_grad()
                padded_mini_batch_backward(student, micro, signals, config)
                default_clip_and_step(student, optimizer, settings.grad_clip)
            rows = sum(mb.logit_rows for mb in micro)
        return phases, rows

    step(measure=False)  # gradients and AdamW state exist from here on: they are "state", not the step's
    gc.collect()
    phases, rows = step(measure=True)
    result.update(phases)
    result["logit_rows_per_target_token"] = rows / n_targets
    return result


@contextmanager
def _phase(phases: dict, name: str, device, measure: bool):
    """Time and peak memory of a phase into ``phases`` (only when ``measure``)."""
    if not measure:
        yield
        return
    gc.collect()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize()
        phases[f"{name}_s"] = time.perf_counter() - start
    phases[f"{name}_peak_bytes"] = mem.peak_bytes


def run_signals(args) -> dict:
    """The teacher phase alone for every signal: host bytes per token and the head's bytes (kept once)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    _, teacher = build_models(args, device, dtype)
    opd = opd_batch(row_lengths(args), args.seed)
    settings = StepSettings(rows_per_mini_batch=args.rows, max_rows=args.micro_rows)
    out = {}
    for signal in SIGNALS:
        loss_type = "reverse_kl"
        config = OPDConfig(
            loss_type=loss_type, teacher_signal=signal, chunk_size=args.chunk_size, vocab_size=VOCAB
        )
        plan = plan_passes(opd, len(opd), settings, config, device=device)
        teacher_out = teacher_phase(teacher, plan, config, device)
        per_token, head = teacher_out.nbytes()
        n_tokens = sum(s.num_tokens for micro in teacher_out.signals for s in micro)
        micro = padded_micro_batches(opd, args.micro_rows, device)
        padded = padded_teacher_signals(teacher, micro, config)
        storages = {}
        for s in padded:
            for t in (s.head_weight_V_H, s.head_bias_V):
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        out[signal] = {
            "bytes_per_token": per_token / n_tokens,
            "head_bytes": head,
            "padded_bytes_per_token": sum(x.nbytes_per_token() * x.num_tokens for x in padded) / n_tokens,
            "padded_head_bytes": sum(storages.values()),
        }
    out["teacher_hidden_size"] = args.teacher_hidden
    return out


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def step_arguments(prog: str, description: str, *, rows: int, chunk_size: int, chunk_help: str, out: str):
    """The options of a benchmark of the real step (model pair, rows, signal, device); ``parse_step_args``
    finishes them."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--rows", type=int, default=rows, help="rollout rows (one mini-batch)")
    parser.add_argument("--micro-rows", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--response-median", type=int, default=200, help="median response tokens")
    parser.add_argument("--response-max", type=int, default=1024, help="longest response (the clip)")
    parser.add_argument("--student-hidden", type=int, default=512)
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--loss-type", default="reverse_kl")
    parser.add_argument("--signal", default="hidden", choices=SIGNALS, help="the signal of the timed step")
    parser.add_argument("--chunk-size", type=int, default=chunk_size, help=chunk_help)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def parse_step_args(parser, argv):
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def parse(argv):
    parser = step_arguments(
        "python -m opd.bench.step",
        __doc__.split("\n\n")[1],
        rows=16,
        chunk_size=256,
        chunk_help="the opd recipe's",
        out="outputs/bench/step.json",
    )
    return parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        result = run_signals(args) if args.child == "signals" else run_path(args, args.child)
        print(json.dumps(result))
        return 0
    lengths = row_lengths(args)
    print(
        f"opd.bench.step on {args.device} ({args.dtype}): V={VOCAB}, student H={args.student_hidden} tied, "
        f"teacher H={args.teacher_hidden} untied ({TEACHER_WIDTH} rows), {args.layers} layers each; "
        f"{args.rows} rows, {args.micro_rows} per micro-batch; prompts {min(p for p, _ in lengths)}-"
        f"{max(p for p, _ in lengths)}, responses {sorted(r for _, r in lengths)} tokens; "
        f"{args.loss_type} from '{args.signal}', chunk_size {args.chunk_size}",
        flush=True,
    )
    results = {}
    for what in ("packed", "padded", "signals"):
        start = time.perf_counter()
        results[what] = run_child("opd.bench.step", [*argv, "--child", what])
        print(f"  {what}: {time.perf_counter() - start:.0f} s", flush=True)
    new, old = results["packed"], results["padded"]
    print(f"\n{'':32}{'new (packed, fused)':>22}{'padded':>14}{'new/padded':>12}")
    for key, label, fmt in (
        ("logit_rows_per_target_token", "logit rows per target token", "{:.2f}"),
        ("teacher_s", "teacher phase time", "{:.2f} s"),
        ("teacher_peak_bytes", "teacher phase peak above state", None),
        ("student_s", "student phase time", "{:.2f} s"),
        ("student_peak_bytes", "student phase peak above state", None),
    ):
        a, b = new[key], old[key]
        show = (lambda v: _gib(v)) if fmt is None else (lambda v, f=fmt: f.format(v))
        print(f"{label:32}{show(a):>22}{show(b):>14}{a / b:>12.3f}")
    print(f"\nteacher signal, host memory (teacher H={args.teacher_hidden}):")
    print(f"{'signal':10}{'bytes/token':>14}{'head (once)':>14}{'padded: head copies':>22}")
    for signal in SIGNALS:
        s = results["signals"][signal]
        print(
            f"{signal:10}{s['bytes_per_token']:>14,.0f}{_gib(s['head_bytes']):>14}{_gib(s['padded_head_bytes']):>22}"
        )
    memory_ratio = new["student_peak_bytes"] / old["student_peak_bytes"]
    checks = {
        "logit rows per target token = 1.00": new["logit_rows_per_target_token"] == 1.0,
        f"student peak above state <= {TARGET_MEMORY_RATIO}x padded ({memory_ratio:.3f})": memory_ratio
        <= TARGET_MEMORY_RATIO,
        "hidden bytes per token = 2 x teacher hidden size": results["signals"]["hidden"]["bytes_per_token"]
        == 2 * args.teacher_hidden,
    }
    print()
    return report_checks(args, lengths, results, checks)


def report_checks(args, lengths, results, checks: dict[str, bool]) -> int:
    """Print the checks, write the JSON report; exit status 1 when a check failed."""
    for text, ok in checks.items():
        print(f"[{'ok' if ok else 'FAIL'}] {text}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
        "lengths": lengths,
        "results": results,
        "checks": checks,
    }
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
