"""The build recipe: every setting that changes the built assets, and the cache key derived from it.

Kept free of torch/transformers imports so that resolving where the assets live is cheap.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# Bump whenever the recipe or the code that builds the assets changes what gets built.
BUILDER_VERSION = "3"


@dataclass(frozen=True)
class ModelSpec:
    """Size of a tiny Qwen2; head_dim = hidden_size / num_heads."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class SFTRecipe:
    """Optimisation settings, and the val-accuracy band at which training stops.

    Training evaluates every ``eval_every`` steps and stops at the first evaluation whose accuracy lies in
    ``stop_band`` with a near-perfect answer format. Overshooting the band (the student learnt faster than
    expected) rolls back to the last evaluation below it, so the student stays weak.
    """

    lr: float
    batch_size: int
    max_steps: int
    warmup_steps: int
    eval_every: int
    stop_band: tuple[float, float]
    min_format_rate: float = 0.95


VOCAB_SIZE = 512
N_TRAIN = 7000
N_VAL = 200
# Tuned on many seeds: the teacher reaches 95% val accuracy after ~450-1400 steps (median ~700).
TEACHER = ModelSpec(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=4, intermediate_size=256)
TEACHER_SFT = SFTRecipe(
    lr=2e-3, batch_size=64, max_steps=2000, warmup_steps=50, eval_every=50, stop_band=(0.95, 1.0)
)
# Smaller, and stopped early, at the start of its learning curve's steep part: this width learns carries
# abruptly (h96: 0.13 -> 0.54 val accuracy within ~100 SFT steps after a slow start), so a short OPD run can
# lift it by tens of points, while a narrower student (h64) climbs too slowly for the CPU demo's budget.
STUDENT = ModelSpec(hidden_size=96, num_layers=2, num_heads=8, num_kv_heads=4, intermediate_size=256)
STUDENT_SFT = SFTRecipe(
    lr=2e-3, batch_size=64, max_steps=1500, warmup_steps=50, eval_every=25, stop_band=(0.15, 0.30)
)
# A build that misses these bounds fails instead of being cached.
TEACHER_MIN_ACCURACY = 0.90
STUDENT_MAX_ACCURACY = 0.40


def recipe() -> dict:
    """All settings of a build, as plain JSON-able data."""
    return {
        "vocab_size": VOCAB_SIZE,
        "n_train": N_TRAIN,
        "n_val": N_VAL,
        "teacher": {"model": asdict(TEACHER), "sft": asdict(TEACHER_SFT)},
        "student": {"model": asdict(STUDENT), "sft": asdict(STUDENT_SFT)},
    }


def build_key(seed: int) -> str:
    """Short hash of builder version + seed + recipe; a build is reused only when its key matches."""
    payload = json.dumps({"version": BUILDER_VERSION, "seed": seed, "recipe": recipe()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---- the tiny agent task (opd.tiny.agent_task): its own tokenizer, teacher and student ------------------
AGENT_BUILDER_VERSION = "3"
AGENT_VOCAB_SIZE = 1024  # a cap: the traces run out of merges at ~990 (~330 tokens per trace)
AGENT_N_TRAIN = 3000
AGENT_N_VAL = 128
AGENT_MAX_POSITIONS = 768  # prompt with the tool schema (up to ~190 tokens) + up to two calls and answers
AGENT_PROMPT_LENGTH = 256
AGENT_RESPONSE_LENGTH = 512
AGENT_MAX_TOOL_CHARS = 1024  # multi_turn.max_tool_response_length of the runs (one route is ~600 characters)
AGENT_TEACHER = ModelSpec(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=4, intermediate_size=256)
AGENT_TEACHER_SFT = SFTRecipe(
    lr=2e-3, batch_size=16, max_steps=1600, warmup_steps=30, eval_every=100, stop_band=(0.95, 1.0)
)
AGENT_STUDENT = ModelSpec(hidden_size=96, num_layers=2, num_heads=8, num_kv_heads=4, intermediate_size=256)
AGENT_STUDENT_SFT = SFTRecipe(
    lr=2e-3, batch_size=16, max_steps=1600, warmup_steps=30, eval_every=50, stop_band=(0.15, 0.40)
)
AGENT_TEACHER_MIN_ACCURACY = 0.90
AGENT_STUDENT_MAX_ACCURACY = 0.45


def agent_recipe() -> dict:
    """All settings of an agent build, as plain JSON-able data."""
    return {
        "vocab_size": AGENT_VOCAB_SIZE,
        "n_train": AGENT_N_TRAIN,
        "n_val": AGENT_N_VAL,
        "max_positions": AGENT_MAX_POSITIONS,
        "prompt_length": AGENT_PROMPT_LENGTH,
        "response_length": AGENT_RESPONSE_LENGTH,
        "max_tool_chars": AGENT_MAX_TOOL_CHARS,
        "teacher": {"model": asdict(AGENT_TEACHER), "sft": asdict(AGENT_TEACHER_SFT)},
        "student": {"model": asdict(AGENT_STUDENT), "sft": asdict(AGENT_STUDENT_SFT)},
    }


def agent_build_key(seed: int) -> str:
    """Like ``build_key``, for the agent build (which never changes the arithmetic assets' key)."""
    payload = json.dumps(
        {"version": AGENT_BUILDER_VERSION, "seed": seed, "recipe": agent_recipe()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
