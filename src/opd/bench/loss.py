"""python -m opd.bench.loss [--n 512 2048] [--kinds reverse_kl forward_kl jsd] [--device auto|cpu|cuda]

Benchmarks ``opd.distill.token_divergence`` (closed-form gradient written into the student logits' storage,
``overwrite_logits=True``, as the OPD worker calls it; ``--extra ours-buffer`` adds the variant with a new
N x V gradient buffer) against a re-implementation of the seed's pattern (``seed_style_divergence``: per
chunk, fp32 log-softmax of student and teacher and the divergence by autograd, every chunk's graph kept until
one backward) on fp32 logits in logits mode, same chunk_size for both. Each step ends with the gradient wrt
the logits (``torch.autograd.grad``), which is what flows on into the output head's backward. It exists to show the speed and memory
gains and that accuracy did not suffer; the two references here are also what the tests compare against.

Each (configuration, implementation) runs in a fresh process: inputs are built, one warm-up step runs, then
``--repeats`` timed forward+backward steps (median reported). Peak extra memory of a step:
- CPU: the kernel's high-water mark of the process's resident memory, reset right before the step
  (``/proc/self/clear_refs``), minus the resident memory at that moment (inputs allocated, previous
  gradient freed); it includes any new N x V gradient the step leaves behind. Where clear_refs is not writable,
  a thread samples /proc/self/statm every millisecond instead.
- CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the allocation before it.
Errors are measured against an fp64 autograd reference on the same fp32 inputs (``exact_divergence``): the
loss's relative error and the gradient's max|g - g64| / max|g64|.
Prints a table (absolute numbers and ours/seed ratios) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from opd.bench import run_child
from opd.distill.losses import DIVERGENCES, reduce_divergence, token_divergence
from opd.distill.teacher_signal import TeacherSignal

TARGET_RATIO = 0.25  # acceptance: time and peak memory at most this fraction of the seed's, at the largest N
_NEG_FLOOR = -1.0e5  # -inf logits become this in fp64: exp(-1e5) is exactly 0, so 0 log 0 terms vanish


def make_inputs(n: int, vocab: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic fp32 student and teacher logits: peaked, correlated distributions like real LMs'."""
    gen = torch.Generator().manual_seed(seed)
    student_N_V = torch.randn(n, vocab, generator=gen).mul_(2.0)
    teacher_N_V = torch.randn(n, vocab, generator=gen).add_(student_N_V)
    return student_N_V.to(device), teacher_N_V.to(device)


def seed_style_divergence(
    student_logits_N_V: torch.Tensor,
    teacher_logits_N_V: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The seed's pattern: per chunk, fp32 log-softmaxes and the divergence by autograd; all graphs stay alive."""
    divs = []
    for start in range(0, student_logits_N_V.shape[0], chunk_size):
        s = torch.log_softmax(student_logits_N_V[start : start + chunk_size, :vocab_size].float(), dim=-1)
        t = torch.log_softmax(teacher_logits_N_V[start : start + chunk_size, :vocab_size].float(), dim=-1)
        if kind == "reverse_kl":
            divs.append((s.exp() * (s - t)).sum(-1))
        elif kind == "forward_kl":
            divs.append((t.exp() * (t - s)).sum(-1))
        else:  # generalized JSD as in TRL's GKD trainer
            log_m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
            kl_t = F.kl_div(log_m, t, reduction="none", log_target=True).sum(-1)
            kl_s = F.kl_div(log_m, s, reduction="none", log_target=True).sum(-1)
            divs.append(beta * kl_t + (1 - beta) * kl_s)
    return torch.cat(divs) if divs else student_logits_N_V.new_zeros(0)


def exact_divergence_chunks(
    student_logits_N_V: torch.Tensor,
    teacher_logits_N_V: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    weight_N: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 16,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """fp64 ground truth, chunk by chunk: (start row, div (n,), grad of sum(weight * div) wrt the student
    logits (n, V_student)), by autograd. Columns beyond vocab_size get zero gradient. (Small chunks keep each
    temporary under glibc's 32 MB mmap threshold at V=151,936, so memory is reused, not faulted in anew.)"""
    N, width = student_logits_N_V.shape
    vocab = vocab_size or width
    for start in range(0, N, chunk_size):
        z = student_logits_N_V[start : start + chunk_size].detach().double().requires_grad_()
        s = torch.log_softmax(z[:, :vocab].clamp_min(_NEG_FLOOR), dim=-1)
        t = torch.log_softmax(
            teacher_logits_N_V[start : start + chunk_size, :vocab].double().clamp_min(_NEG_FLOOR), -1
        )
        p, q = s.exp(), t.exp()
        if kind == "reverse_kl":
            div = (p * (s - t)).sum(-1)
        elif kind == "forward_kl":
            div = (q * (t - s)).sum(-1)
        else:
            log_m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
            div = beta * (q * (t - log_m)).sum(-1) + (1 - beta) * (p * (s - log_m)).sum(-1)
        w = torch.ones_like(div) if weight_N is None else weight_N[start : start + chunk_size].to(div)
        (grad,) = torch.autograd.grad((div * w).sum(), z)
        yield start, div.detach(), grad


def exact_divergence(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``exact_divergence_chunks`` concatenated: (div_N, grad_N_V), fp64."""
    chunks = list(exact_divergence_chunks(*args, **kwargs))
    return torch.cat([c[1] for c in chunks]), torch.cat([c[2] for c in chunks])


class PeakMemory:
    """Peak extra memory of a block of code (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self._thread = _rss(), None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self._peak, self._stop = self.base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        elif self._thread is None:
            self.peak_bytes = _proc_status_bytes("VmHWM") - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss()) - self.base


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(
    impl: str, n: int, vocab: int, kind: str, beta: float, chunk_size: int, repeats: int, device: str
) -> dict:
    """One implementation on one configuration, in this process: times, peak memory and errors."""
    dev = torch.device(device)
    student, teacher = make_inputs(n, vocab, device=device)
    student.requires_grad_()
    signal = TeacherSignal.from_logits(
        teacher, dtype=torch.float32, device=device
    )  # the same tensor, no copy

    overwrite = impl == "ours"
    original = student.detach().clone() if overwrite else None  # restored before every step

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        if impl in ("ours", "ours-buffer"):
            div_N = token_divergence(
                student, signal, kind, beta=beta, chunk_size=chunk_size, overwrite_logits=overwrite
            )[0]
            loss = reduce_divergence(div_N)
        else:
            loss = seed_style_divergence(student, teacher, kind, beta=beta, chunk_size=chunk_size).mean()
        (grad,) = torch.autograd.grad(loss, student)
        return loss.detach(), grad

    def restore() -> None:
        if original is not None:
            with torch.no_grad():
                student.copy_(original)

    step()  # warm-up
    times, peaks, grad = [], [], None
    for _ in range(repeats):
        grad = None
        restore()
        gc.collect()
        with PeakMemory(dev) as mem:
            start = time.perf_counter()
            loss, grad = step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak_bytes)
    if overwrite:
        grad = grad.clone()  # it lives in the logits' storage, which the errors below need restored
    restore()

    loss64, grad_err, grad_scale = 0.0, 0.0, 0.0
    for start, div64, grad64 in exact_divergence_chunks(
        student, teacher, kind, beta=beta, weight_N=torch.full((n,), 1.0 / n, dtype=torch.float64)
    ):
        loss64 += float(div64.sum()) / n
        grad_rows = grad[start : start + len(div64)].double()
        grad_err = max(grad_err, float((grad_rows - grad64).abs().max()))
        grad_scale = max(grad_scale, float(grad64.abs().max()))
    return {
        "impl": impl,
        "n": n,
        "kind": kind,
        "times_s": times,
        "time_s": statistics.median(times),
        "peak_bytes": max(peaks),
        "grad_bytes": grad.numel() * grad.element_size(),
        "loss": float(loss),
        "loss_rel_err": abs(float(loss) - loss64) / abs(loss64),
        "grad_rel_err": grad_err / grad_scale,
    }


def _in_fresh_process(config: dict) -> dict:
    return run_child("opd.bench.loss", ["--child", json.dumps(config)])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.bench.loss", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--n", type=int, nargs="+", default=[512, 2048], help="response tokens per micro-batch"
    )
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--kinds", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="outputs/bench/loss.json")
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        choices=["ours-buffer"],
        help="also run ours with the gradient in a new N x V buffer (overwrite_logits=False)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return 0

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"loss benchmark on {where}: V={args.vocab}, chunk_size={args.chunk_size}, fp32 logits, logits mode"
    )
    configs = [(n, kind) for n in args.n for kind in args.kinds]
    results, rows, pairs = [], [], []
    for i, (n, kind) in enumerate(configs, 1):
        pair = {}
        for impl in ("seed", "ours", *args.extra):
            config = dict(impl=impl, n=n, vocab=args.vocab, kind=kind, beta=args.beta)
            config.update(chunk_size=args.chunk_size, repeats=args.repeats, device=device)
            pair[impl] = r = _in_fresh_process(config)
            results.append(r)
            print(
                f"[{i}/{len(configs)}] N={n} {kind:<10} {impl:<4}: {r['time_s']:.3f} s "
                f"(runs {', '.join(f'{t:.2f}' for t in r['times_s'])}), peak +{_gib(r['peak_bytes'])}, "
                f"loss rel err {r['loss_rel_err']:.1e}, grad rel err {r['grad_rel_err']:.1e}",
                flush=True,
            )
        ours, seed = pair["ours"], pair["seed"]
        pairs.append((ours, seed))
        rows.append(
            dict(
                n=n,
                kind=kind,
                time_ratio=ours["time_s"] / seed["time_s"],
                mem_ratio=ours["peak_bytes"] / seed["peak_bytes"],
                grad_floor_ratio=ours["grad_bytes"] / seed["peak_bytes"],
            )
        )

    header = (
        f"{'N':>5} {'kind':<10} | {'time ours':>9} {'seed':>8} {'ratio':>6} | {'peak ours':>10} {'seed':>10} "
        f"{'ratio':>6} | {'loss err ours':>13} {'seed':>7} | {'grad err ours':>13} {'seed':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row, (ours, seed) in zip(rows, pairs, strict=True):
        print(
            f"{row['n']:>5} {row['kind']:<10} | {ours['time_s']:>7.3f} s {seed['time_s']:>6.2f} s "
            f"{row['time_ratio']:>5.3f}x | {_gib(ours['peak_bytes']):>10} {_gib(seed['peak_bytes']):>10} "
            f"{row['mem_ratio']:>5.3f}x | {ours['loss_rel_err']:>13.1e} {seed['loss_rel_err']:>7.1e} | "
            f"{ours['grad_rel_err']:>13.1e} {seed['grad_rel_err']:>7.1e}"
        )
    n_max = max(args.n)
    print(f"\ntarget at N={n_max}: time and peak memory each <= {TARGET_RATIO}x the seed's")
    for row in (r for r in rows if r["n"] == n_max):
        time_ok, mem_ok = row["time_ratio"] <= TARGET_RATIO, row["mem_ratio"] <= TARGET_RATIO
        floor = f"; the N x V gradient alone is {row['grad_floor_ratio']:.4f}x of the seed's peak"
        print(
            f"  {row['kind']:<10} time {row['time_ratio']:.3f}x {'met' if time_ok else 'NOT met'}, "
            f"memory {row['mem_ratio']:.4f}x {'met' if mem_ok else 'NOT met'}{'' if mem_ok else floor}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=where, vocab=args.vocab, chunk_size=args.chunk_size, beta=args.beta, repeats=args.repeats
    )
    out.write_text(json.dumps(dict(meta, results=results, ratios=rows), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
