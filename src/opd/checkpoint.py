"""python -m opd.checkpoint convert PATH [--target DIR] [--no-verify]   (also: make convert CHECKPOINT=PATH)

Turns a verl FSDP actor checkpoint into a Hugging Face model directory and checks the result.

verl saves each actor checkpoint as ``<run>/checkpoints/global_step_N/actor/``: one
``model_world_size_W_rank_R.pt`` state dict per rank (FSDP2 DTensors: each rank's slice plus its
placement), optimizer and extra-state files, ``fsdp_config.json`` and ``huggingface/`` with the model
config and tokenizer but no weights. PATH may be the ``global_step_N`` dir, its ``actor/`` dir, or the
run dir or its ``checkpoints/`` dir (then the step in ``latest_checkpointed_iteration.txt``). The layout
is checked before anything heavy is loaded, so a wrong path fails at once with one message naming the fix.

verl's own merger (``verl.model_merger``, run in-process) writes the model; by default into
``actor/huggingface`` next to the config and tokenizer, so that directory becomes a complete model.
The merger stores every weight in bfloat16, whatever the training dtype.

Verification (skip with ``--no-verify``) does not trust the merger: it reassembles the full state dict
from the shards itself, requires every converted tensor to equal its reassembled counterpart cast to the
stored dtype, and compares the logits of the converted model with those of a model built from the same
config holding the full-precision reassembled weights, on a fixed token batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from opd.data.checks import InputError
from opd.runtime import exit_on_input_error

SHARD_PATTERN = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
LATEST_STEP_FILE = "latest_checkpointed_iteration.txt"
HF_SUBDIR = "huggingface"
# Written into the target: which checkpoint it holds, so a re-run may overwrite it and another may not.
MARKER_FILE = "opd_conversion.json"
CONVERSION_HINT = (
    "point at a verl checkpoint's global_step_N dir or its actor/ dir "
    f"(or at the run or checkpoints/ dir holding {LATEST_STEP_FILE})"
)


class VerificationError(RuntimeError):
    """The converted model is not the checkpoint: a tensor or the logits differ beyond tolerance."""


@dataclass(frozen=True)
class ActorCheckpoint:
    """A validated actor checkpoint directory: complete shard set, world size, HF config dir."""

    actor_dir: Path
    world_size: int
    shards: tuple[Path, ...]  # indexed by rank
    hf_dir: Path


@dataclass(frozen=True)
class Verification:
    n_tensors: int
    dtype: str  # the stored dtype of the converted weights (the lowest precision if mixed)
    max_abs_logit_diff: float  # converted model vs the full-precision shard weights
    logit_tolerance: float
    max_abs_logit_diff_cast: float  # vs the shard weights cast to the stored dtype: only loading differs


@dataclass(frozen=True)
class ConversionReport:
    actor_dir: Path
    target: Path
    world_size: int
    n_tensors: int
    max_abs_logit_diff: float | None  # None when verification was skipped
    verification: Verification | None = None


def find_actor_checkpoint(path: str | Path) -> ActorCheckpoint:
    """Resolve PATH to an actor dir with every rank's shard, fsdp_config.json and huggingface/config.json."""
    given = Path(path).expanduser()
    if not given.exists():
        raise InputError(f"checkpoint path {path} does not exist: {CONVERSION_HINT}")
    if not given.is_dir():
        raise InputError(f"checkpoint path {path} is a file, not a directory: {CONVERSION_HINT}")
    if not (given / LATEST_STEP_FILE).is_file() and (given / "checkpoints" / LATEST_STEP_FILE).is_file():
        given = given / "checkpoints"  # a run dir
    step_dir = given
    latest = given / LATEST_STEP_FILE
    if latest.is_file():
        step = latest.read_text().strip()
        step_dir = given / f"global_step_{step}"
        if not step.isdigit() or not step_dir.is_dir():
            raise InputError(
                f"{latest} names step {step!r} but {step_dir} does not exist: point at a step dir"
            )
        print(f"{latest}: latest step {step}")
    actor_dir = step_dir / "actor" if (step_dir / "actor").is_dir() else step_dir

    by_size: dict[int, dict[int, Path]] = {}
    for file in actor_dir.iterdir():
        match = SHARD_PATTERN.match(file.name)
        if match and file.is_file():
            by_size.setdefault(int(match[1]), {})[int(match[2])] = file
    if not by_size:
        entries = sorted(f"{e.name}/" if e.is_dir() else e.name for e in actor_dir.iterdir())
        steps = [e for e in entries if e.startswith("global_step_")]
        found = f"step dirs {', '.join(steps)}" if steps else (", ".join(entries[:12]) or "nothing")
        if len(entries) > 12 and not steps:
            found += f", ... ({len(entries)} entries)"
        raise InputError(
            f"no model shards (model_world_size_W_rank_R.pt) in {actor_dir}; found {found}: {CONVERSION_HINT}"
        )
    if len(by_size) > 1:
        raise InputError(
            f"{actor_dir} holds model shards for several world sizes ({sorted(by_size)}): keep only the "
            "files of one save (model_world_size_W_rank_*.pt for a single W)"
        )
    ((world_size, ranks),) = by_size.items()
    missing = [r for r in range(world_size) if r not in ranks]
    extra = sorted(r for r in ranks if r >= world_size)
    if missing or extra:
        names = ", ".join(f"model_world_size_{world_size}_rank_{r}.pt" for r in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        problem = f"missing {names}{more}" if missing else f"unexpected ranks {extra}"
        raise InputError(
            f"{actor_dir}: world size {world_size} but {len(ranks)} rank file(s), {problem}: every rank writes "
            "its own shard, so copy the complete checkpoint directory"
        )

    fsdp_config = actor_dir / "fsdp_config.json"
    if not fsdp_config.is_file():
        raise InputError(
            f"no fsdp_config.json in {actor_dir}: verl writes it with the shards and its merger reads the world "
            f'size from it; restore it or write {{"FSDP_version": 2, "world_size": {world_size}}}'
        )
    saved_size = json.loads(fsdp_config.read_text()).get("world_size")
    if saved_size != world_size:
        raise InputError(
            f"{fsdp_config} says world_size {saved_size} but the shard files say {world_size}: "
            "the directory mixes two saves"
        )
    hf_dir = actor_dir / HF_SUBDIR
    if not (hf_dir / "config.json").is_file():
        raise InputError(
            f"no {HF_SUBDIR}/config.json in {actor_dir}: verl saves the model config and tokenizer there with "
            f"every checkpoint; copy config.json and the tokenizer files of the trained base model into {hf_dir}"
        )
    return ActorCheckpoint(actor_dir, world_size, tuple(ranks[r] for r in range(world_size)), hf_dir)


def check_target(target: Path, checkpoint: ActorCheckpoint) -> None:
    """Refuse a target that holds anything but this checkpoint's files: the merger would mix the two."""
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(f"--target {target} exists and is not a directory: choose another --target")
    if target.resolve() == checkpoint.hf_dir.resolve():
        return  # the checkpoint's own config/tokenizer dir: the conversion completes it
    marker = target / MARKER_FILE
    if marker.is_file():
        source = json.loads(marker.read_text()).get("source")
        if source == str(checkpoint.actor_dir.resolve()):
            return  # an earlier conversion of this checkpoint
        held = f"holds a model converted from {source}"
    else:
        entries = sorted(e.name for e in target.iterdir())
        if not entries:
            return
        held = "holds a model" if "config.json" in entries else f"is not empty ({', '.join(entries[:6])})"
    raise InputError(
        f"--target {target} {held}, not a conversion of {checkpoint.actor_dir}: "
        "remove it or choose another --target"
    )


def _snapshot(directory: Path) -> dict[str, int]:
    return (
        {f.name: f.stat().st_mtime_ns for f in directory.iterdir() if f.is_file()}
        if directory.is_dir()
        else {}
    )


def merge(checkpoint: ActorCheckpoint, target: Path) -> list[Path]:
    """Run verl's FSDP merger in-process; return the files it wrote or rewrote in ``target``."""
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    before = _snapshot(target)
    target.mkdir(parents=True, exist_ok=True)
    config = ModelMergerConfig(
        operation="merge",
        backend="fsdp",
        local_dir=str(checkpoint.actor_dir),
        target_dir=str(target),
        hf_model_config_path=str(checkpoint.hf_dir),
    )
    with _quiet_device_mesh():
        merger = FSDPModelMerger(config)
        merger.merge_and_save()
        merger.cleanup()
    after = _snapshot(target)
    return [target / name for name in sorted(after) if before.get(name) != after[name]]


@contextlib.contextmanager
def _quiet_device_mesh():
    """Unpickling a DTensor's DeviceMesh without a process group warns once per load; it is harmless here."""
    logger = logging.getLogger("torch.distributed.device_mesh")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def reassemble(checkpoint: ActorCheckpoint) -> dict:
    """The full state dict from the shards, independently of verl's merger.

    A DTensor is put back together over its device mesh: along a ``Shard(d)`` mesh dim the ranks' local
    tensors are concatenated on tensor dim ``d`` (in rank order), along a ``Replicate`` one the first copy
    is taken. A plain tensor is taken from rank 0.
    """
    import torch

    with _quiet_device_mesh():
        states = [torch.load(p, map_location="cpu", weights_only=False) for p in checkpoint.shards]
    keys = list(states[0])
    for rank, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            odd = sorted(set(state) ^ set(keys))[:5]
            raise VerificationError(f"rank {rank} holds other tensors than rank 0 (e.g. {odd})")
    full = {}
    for key in keys:
        first = states[0][key]
        if not hasattr(first, "placements"):
            if not isinstance(first, torch.Tensor):
                raise VerificationError(f"{key}: unsupported shard type {type(first).__name__}")
            full[key] = first
            continue
        mesh = first.device_mesh.mesh
        if mesh.numel() != checkpoint.world_size:
            raise VerificationError(
                f"{key}: device mesh {tuple(mesh.shape)} for world size {checkpoint.world_size}"
            )
        local = {rank: state[key].to_local() for rank, state in enumerate(states)}
        tensor = _assemble(mesh, tuple(first.placements), local, key)
        if tuple(tensor.shape) != tuple(first.shape):
            raise VerificationError(
                f"{key}: reassembled shape {tuple(tensor.shape)}, DTensor says {tuple(first.shape)}"
            )
        full[key] = tensor
    return full


def _assemble(mesh, placements: tuple, local: dict, key: str):
    import torch

    if not placements:
        return local[int(mesh)]
    placement, rest = placements[0], placements[1:]
    if placement.is_replicate():
        return _assemble(mesh[0], rest, local, key)
    if placement.is_shard():
        return torch.cat([_assemble(sub, rest, local, key) for sub in mesh], dim=placement.dim)
    raise VerificationError(f"{key}: placement {placement} cannot be reassembled from saved shards")


def _stored_dtypes(model_dir: Path) -> dict:
    """Each tensor's dtype as stored in the target's *.safetensors headers (loading in fp32 hides it)."""
    import torch

    names = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    dtypes = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in names:
                dtypes[name] = names[info["dtype"]]
    if not dtypes:
        raise VerificationError(f"no *.safetensors weights in {model_dir}")
    return dtypes


def verify_conversion(path: str | Path, target: str | Path) -> Verification:
    """Check a converted model in ``target`` against the shards of the checkpoint at ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = find_actor_checkpoint(path)
    target = Path(target)
    print(f"verifying {target} against {checkpoint.world_size} shard(s) in {checkpoint.actor_dir}")
    full = reassemble(checkpoint)
    stored = _stored_dtypes(target)
    converted = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    converted_state = converted.state_dict()
    # Tied weights (lm_head = embed_tokens) are stored once: the others take the most common stored dtype.
    common = max(set(stored.values()), key=list(stored.values()).count)
    dtype_of = {key: stored.get(key, common) for key in full}

    missing = sorted(full.keys() - converted_state.keys())
    extra = sorted(converted_state.keys() - full.keys())
    if missing or extra:
        raise VerificationError(
            f"tensor names differ: not converted {missing[:5]}, not in the shards {extra[:5]}"
        )
    cast = {key: full[key].to(dtype_of[key]).to(torch.float32) for key in full}
    wrong = []
    for key, expected in cast.items():
        got = converted_state[key]
        if got.shape != expected.shape:
            wrong.append(f"{key}: shape {tuple(got.shape)} vs {tuple(expected.shape)} in the shards")
        elif not torch.equal(got, expected):
            wrong.append(f"{key}: max |diff| {(got - expected).abs().max().item():.3g}")
    if wrong:
        raise VerificationError(
            f"{len(wrong)} of {len(full)} converted tensors differ from the shards "
            f"(cast to the stored dtype): {'; '.join(wrong[:5])}"
        )
    print(f"  {len(full)} tensors equal the reassembled shards cast to the stored dtype")

    # The forward pass checks what the tensors cannot: the config and how the weights are wired in.
    reference = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(checkpoint.hf_dir), dtype=torch.float32
    ).eval()
    vocab = converted.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = converted(tokens).logits
        reference.load_state_dict({k: v.to(torch.float32) for k, v in full.items()}, strict=True)
        full_logits = reference(tokens).logits
        reference.load_state_dict(cast, strict=True)
        cast_logits = reference(tokens).logits
    scale = max(1.0, full_logits.abs().max().item())
    diff = (logits - full_logits).abs().max().item()
    diff_cast = (logits - cast_logits).abs().max().item()
    lowest = max(set(dtype_of.values()), key=lambda d: torch.finfo(d).eps)
    tolerance = logit_tolerance(lowest, scale)
    print(
        f"  max |Δlogits| vs the full-precision shards: {diff:.3g} (tolerance {tolerance:.3g} for "
        f"{str(lowest).removeprefix('torch.')} weights, logits up to {scale:.3g}); "
        f"vs the shards cast to {str(lowest).removeprefix('torch.')}: {diff_cast:.3g}"
    )
    if not diff_cast <= 1e-5 * scale:
        raise VerificationError(
            f"the converted model's logits differ from a model with the same weights by {diff_cast:.3g}: "
            f"its config or architecture is not the checkpoint's ({checkpoint.hf_dir}/config.json)"
        )
    if not diff <= tolerance:
        raise VerificationError(
            f"max |Δlogits| {diff:.3g} vs the full-precision shards exceeds the tolerance {tolerance:.3g}"
        )
    return Verification(len(full), str(lowest).removeprefix("torch."), diff, tolerance, diff_cast)


def logit_tolerance(dtype, scale: float) -> float:
    """How far logits may move when the weights are rounded to ``dtype``: 8 epsilons of it relative to the
    logit scale. Rounding the tiny student's fp32 weights to bfloat16 moves its logits by ~0.3 eps x scale;
    deeper models accumulate more. Anything structural (a tensor misplaced, a config changed) is caught
    exactly by the tensor and same-weights checks, so this bound only has to flag gross precision loss."""
    import torch

    return 8 * torch.finfo(dtype).eps * scale


def convert(path: str | Path, target: str | Path | None = None, verify: bool = True) -> ConversionReport:
    """Convert the checkpoint at ``path`` to a Hugging Face model in ``target`` (default: actor/huggingface)."""
    checkpoint = find_actor_checkpoint(path)
    target = Path(target).expanduser() if target else checkpoint.hf_dir
    check_target(target, checkpoint)
    print(
        f"checkpoint {checkpoint.actor_dir}: world size {checkpoint.world_size}, "
        f"shards {', '.join(p.name for p in checkpoint.shards[:4])}{' ...' if checkpoint.world_size > 4 else ''}"
    )
    print(f"converting to {target} with verl's FSDP merger")
    start = time.perf_counter()
    written = merge(checkpoint, target)
    _write_marker(target, checkpoint, verified=None)
    print(f"wrote {', '.join(p.name for p in written)} in {time.perf_counter() - start:.1f} s")
    if not verify:
        print("verification skipped (--no-verify)")
        return ConversionReport(
            checkpoint.actor_dir, target, checkpoint.world_size, _count_tensors(checkpoint), None
        )
    try:
        result = verify_conversion(checkpoint.actor_dir, target)
    except VerificationError:
        _write_marker(target, checkpoint, verified=False)
        raise
    _write_marker(target, checkpoint, verified=True, **asdict(result))
    print(f"verified: {target} is the checkpoint's model")
    return ConversionReport(
        checkpoint.actor_dir,
        target,
        checkpoint.world_size,
        result.n_tensors,
        result.max_abs_logit_diff,
        result,
    )


def _write_marker(target: Path, checkpoint: ActorCheckpoint, **fields) -> None:
    marker = {"source": str(checkpoint.actor_dir.resolve()), "world_size": checkpoint.world_size, **fields}
    (target / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _count_tensors(checkpoint: ActorCheckpoint) -> int:
    import torch

    with _quiet_device_mesh():
        return len(torch.load(checkpoint.shards[0], map_location="cpu", mmap=True, weights_only=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.checkpoint", description=__doc__.splitlines()[2])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="verl FSDP actor checkpoint -> Hugging Face model directory")
    conv.add_argument("path", help="global_step_N dir, its actor/ dir, or a run dir / its checkpoints/ dir")
    conv.add_argument("--target", help="output directory (default: <actor dir>/huggingface)")
    conv.add_argument("--no-verify", action="store_true", help="skip the comparison with the shards")
    args = parser.parse_args(argv)
    try:
        convert(args.path, args.target, verify=not args.no_verify)
    except InputError as error:
        exit_on_input_error(error)
    except VerificationError as error:
        print(f"error: verification failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
