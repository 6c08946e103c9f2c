"""The OPD method's settings (the ``opd:`` group of the trainer config) as a typed, validated config.

``OPDConfig.from_mapping(config.opd)`` checks every key, type, range and combination; ``check_trainer``
checks the verl settings the two-phase step reads (batch sizes, rollout sampling, features it does not
support yet). Both run in ``opd.main_opd.check_config``: at start-up before Ray, and on the login node
before a job is submitted (``make submit`` / ``make sweep-*`` compose and check each run). This module
imports neither torch nor verl: login nodes often have neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
SIGNALS = ("logits", "hidden", "topk", "sampled")
# divergences each teacher signal supports (sampled: the one-token estimator of the reverse KL only)
SUPPORTED = {"logits": DIVERGENCES, "hidden": DIVERGENCES, "topk": DIVERGENCES, "sampled": ("reverse_kl",)}
OVERLONG_POLICIES = ("truncate", "skip", "error")
# token-mean: sum_n w_n d_n / sum_n w_n over the mini-batch's tokens (every token counts the same);
# seq-mean-token-mean: sum_i w_i mean_i / sum_i w_i over its rows (every response counts the same,
# whatever its length: the original repository's per-sample weighting)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")


class OPDConfigError(ValueError):
    """An ``opd:`` setting (or a verl setting the OPD step reads) that cannot run; the message names the fix."""


@dataclass(frozen=True)
class OPDConfig:
    """Every ``opd.*`` key. Defaults equal ``src/opd/config/opd_trainer.yaml``'s."""

    teacher_path: str | None = None  # a HF model dir sharing the student's tokenizer
    loss_type: str = "reverse_kl"  # one of DIVERGENCES
    beta: float = 0.5  # jsd: the teacher's weight in the mixture, strictly between 0 and 1
    teacher_signal: str = "hidden"  # one of SIGNALS: what phase 1 keeps per token for phase 2
    topk: int = 64  # teacher_signal=topk: teacher tokens kept per position
    chunk_size: int = 1024  # target tokens per chunk of the output-head divergence
    max_length: int = 16384  # prompt + response tokens per row
    overlong: str = "truncate"  # rows over max_length: one of OVERLONG_POLICIES
    reward_beta: float = 0.0  # > 0: reward-weighted distillation, w = softmax(r / reward_beta) * B
    loss_agg_mode: str = "token-mean"  # one of LOSS_AGG_MODES
    vocab_size: int | None = None  # filled at start-up: the compared vocabulary (the tokenizer's size)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _one_of("loss_type", self.loss_type, DIVERGENCES)
        _one_of("teacher_signal", self.teacher_signal, SIGNALS)
        _one_of("overlong", self.overlong, OVERLONG_POLICIES)
        _one_of("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if self.loss_type not in SUPPORTED[self.teacher_signal]:
            modes = [m for m, kinds in SUPPORTED.items() if self.loss_type in kinds]
            raise OPDConfigError(
                f"opd.loss_type={self.loss_type} is not supported with opd.teacher_signal={self.teacher_signal} "
                f"(it supports {list(SUPPORTED[self.teacher_signal])}); use teacher_signal in {modes}"
            )
        if self.loss_type == "jsd" and not 0.0 < self.beta < 1.0:
            raise OPDConfigError(
                f"opd.beta={self.beta}: jsd needs 0 < beta < 1 (at 0 or 1 the mixture is one of the two "
                "distributions and JSD is identically 0); use e.g. opd.beta=0.5"
            )
        for name, low in (("topk", 1), ("chunk_size", 1), ("max_length", 2)):
            if getattr(self, name) < low:
                raise OPDConfigError(f"opd.{name}={getattr(self, name)} must be >= {low}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise OPDConfigError(
                f"opd.vocab_size={self.vocab_size} must be positive (or null: filled at start)"
            )
        if self.teacher_signal == "topk" and self.vocab_size is not None and self.topk > self.vocab_size:
            raise OPDConfigError(f"opd.topk={self.topk} exceeds the vocabulary ({self.vocab_size} tokens)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> OPDConfig:
        """From the ``opd:`` group (a dict or a DictConfig); an unknown key is refused with the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: mapping[key] for key in mapping}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OPDConfigError(
                f"unknown opd key(s) {unknown}: the known keys are {sorted(known)} "
                "(see src/opd/config/opd_trainer.yaml)"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_trainer(opd: OPDConfig, actor_rollout_ref: Mapping[str, Any]) -> None:
    """The verl settings of ``actor_rollout_ref`` that the OPD step reads or cannot honour yet."""
    actor, rollout, model = (
        actor_rollout_ref["actor"],
        actor_rollout_ref["rollout"],
        actor_rollout_ref["model"],
    )
    if int(actor.get("ulysses_sequence_parallel_size", 1) or 1) > 1:
        raise OPDConfigError(
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size > 1: the OPD step does not split sequences "
            "across ranks yet; set it to 1 (pack shorter micro-batches with ppo_max_token_len_per_gpu instead)"
        )
    if model.get("use_fused_kernels", False):
        raise OPDConfigError(
            "actor_rollout_ref.model.use_fused_kernels=true: the OPD step has its own fused output-head "
            "divergence and verl's fused kernels would replace the output head it needs; set it to false"
        )
    if actor.get("use_dynamic_bsz", False):
        budget = actor.get("ppo_max_token_len_per_gpu")
        if not isinstance(budget, int) or budget < 1:
            raise OPDConfigError(
                f"actor_rollout_ref.actor.use_dynamic_bsz=true needs ppo_max_token_len_per_gpu (tokens per "
                f"micro-batch), got {budget!r}"
            )
    else:
        rows = actor.get("ppo_micro_batch_size_per_gpu")
        if not isinstance(rows, int) or rows < 1:
            raise OPDConfigError(
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu must be a positive row count (or set "
                f"use_dynamic_bsz=true with ppo_max_token_len_per_gpu), got {rows!r}"
            )
    if opd.teacher_signal == "sampled":
        temperature = float(rollout.get("temperature", 1.0))
        top_p = float(rollout.get("top_p", 1.0))
        top_k = rollout.get("top_k", -1)
        if temperature != 1.0 or top_p != 1.0 or top_k not in (-1, 0, None):
            raise OPDConfigError(
                "opd.teacher_signal=sampled estimates the reverse KL from tokens sampled from the student's own "
                f"distribution, but the rollout samples with temperature={temperature}, top_p={top_p}, "
                f"top_k={top_k} (biased); set actor_rollout_ref.rollout.temperature=1.0, top_p=1.0, top_k=-1, "
                "or use teacher_signal=hidden (exact)"
            )


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OPDConfigError(f"opd.{name}={value}: choose one of {sorted(choices)}")


def _check_type(name: str, value: Any, annotation: str) -> None:
    """The annotation as written above (``from __future__ import annotations`` keeps it a string)."""
    optional = annotation.endswith("| None")
    if value is None:
        if optional:
            return
        raise OPDConfigError(f"opd.{name} must be set (it has no null value)")
    base = annotation.removesuffix("| None").strip()
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
    }[base]
    if not ok:
        raise OPDConfigError(f"opd.{name}={value!r} must be a {base}")
