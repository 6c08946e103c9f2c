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
# where the distilled tokens come from: the student's own rollouts (on-policy), or stored ones (a teacher's,
# written with their token ids by python -m opd.main_eval ... eval.save_rollouts=true; opd.distill.stored)
ROLLOUT_SOURCES = ("student", "stored")
# divergences each teacher signal supports (sampled: the one-token estimator of the reverse KL only)
SUPPORTED = {"logits": DIVERGENCES, "hidden": DIVERGENCES, "topk": DIVERGENCES, "sampled": ("reverse_kl",)}
OVERLONG_POLICIES = ("truncate", "skip", "error")
# token-mean: sum_n w_n d_n / sum_n w_n over the mini-batch's tokens (every token counts the same);
# seq-mean-token-mean: sum_i w_i mean_i / sum_i w_i over its rows (every response counts the same,
# whatever its length: the original repository's per-sample weighting)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")

# token-selection rules (opd.token_selection.rule), scored per target token from the student's normalised
# entropy h = H(p_s) / log V and the divergence d (the configured loss's, per token):
#   all: every token; entropy: h; divergence: d; random: uniform (the control);
#   soft_or: 1 - (1 - h')(1 - d'), h' = h clipped at its entropy_clip_quantile then min-max, d' = min-max d;
#   q3: forward KL(teacher || student) x (1 - h'), the "overconfident and wrong" tokens (low h, high d)
SELECTION_RULES = ("all", "entropy", "divergence", "soft_or", "q3", "random")
# rollout: each response keeps its top floor(ratio x its tokens), at least one (no response drops out),
# ranked and normalised among its own tokens;
# mini_batch: this rank's mini-batch keeps its top floor(ratio x its tokens) (a no-grad scoring forward of
# the mini-batch first: the ranking needs every micro-batch's scores before the first gradient pass)
SELECTION_SCOPES = ("rollout", "mini_batch")
# kept: the loss is the mean over kept tokens (the selection is a loss mask: sum w d over kept / sum w over
# kept); all: over the tokens before selection (dropped tokens count as zeros: the loss shrinks with ratio)
SELECTION_NORMALISERS = ("kept", "all")
# rules that rank by the divergence, which the sampled signal gives only as a one-token estimate
_RULES_NEEDING_DIVERGENCE = ("divergence", "soft_or", "q3")


# sample weighting (opd.sample_weighting.method), one weight per rollout row on the driver:
#   auto: the original repository's behaviour: reward_softmax when opd.reward_beta > 0, else none;
#   none: every row 1; reward_softmax: w = softmax(r / opd.reward_beta) x B over the batch;
#   paced: w = p^alpha (1 - p)^beta, p = the prompt's pass rate over its rollout.n samples (PACED)
SAMPLE_WEIGHTINGS = ("auto", "none", "reward_softmax", "paced")
# mean: weights scaled to mean 1 over the rows that keep a weight (the loss is the weighted mean of the
# divergence: the step divides by the weights' sum, so the loss scale is unweighted distillation's);
# none: raw weights and a normaliser that counts every rollout's tokens (rows) unweighted, those dropped for
# weight 0 included (the plain mean of w x d), so a batch whose prompts carry little signal gives a smaller
# loss and gradient
WEIGHT_NORMALISERS = ("mean", "none")
# the divergence schedule's stage boundaries (opd.schedule.unit): fraction of the training's steps, or steps
SCHEDULE_UNITS = ("fraction", "step")
# opd.teacher: model (the model at teacher_path) | self (a frozen copy of the initial student)
TEACHERS = ("model", "self")


class OPDConfigError(ValueError):
    """An ``opd:`` setting (or a verl setting the OPD step reads) that cannot run; the message names the fix."""


@dataclass(frozen=True)
class TokenSelection:
    """``opd.token_selection.*``: which target tokens enter the student's update (token importance, TIP).

    With a rule other than ``all``, a no-grad scoring pass over the output head gives every token's
    entropy and divergence, then the gradient pass (output head, divergence and their backward) runs for
    the kept tokens only. The student's transformer forward and backward still run over every token.
    """

    rule: str = "all"  # one of SELECTION_RULES
    ratio: float = 1.0  # kept fraction, in (0, 1]
    scope: str = "rollout"  # one of SELECTION_SCOPES
    normalise: str = "kept"  # one of SELECTION_NORMALISERS
    entropy_clip_quantile: float = (
        0.98  # soft_or/q3: h is clipped at this quantile of the batch before min-max
    )
    # quadrant diagnostics (opd/tokens/q1..q4_share): high/low entropy and divergence split at these
    # values (h is the normalised entropy in [0, 1], d the per-token divergence in nats); null: the median
    # of each micro-batch's tokens
    entropy_threshold: float | None = None
    divergence_threshold: float | None = None
    # entropy/random rules score without the teacher (random: not at all), so dropped tokens have no
    # divergence and the quadrant metrics are left out; true: compute it anyway (the teacher's side of the
    # head over every token, as the divergence-ranked rules always do)
    full_diagnostics: bool = False
    # > 0: per step and rank, this many (entropy, divergence, kept) triples go to token_pairs.jsonl
    sample_pairs: int = 0
    seed: int = 0  # the random rule's draws (with the step and the micro-batch)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f"token_selection.{f.name}", getattr(self, f.name), f.type)
        _one_of("token_selection.rule", self.rule, SELECTION_RULES)
        _one_of("token_selection.scope", self.scope, SELECTION_SCOPES)
        _one_of("token_selection.normalise", self.normalise, SELECTION_NORMALISERS)
        if not 0.0 < self.ratio <= 1.0:
            raise OPDConfigError(
                f"opd.token_selection.ratio={self.ratio} must lie in (0, 1]: the fraction of target tokens kept"
            )
        if self.rule == "all" and self.ratio != 1.0:
            raise OPDConfigError(
                f"opd.token_selection.ratio={self.ratio} with rule=all (which keeps every token): choose a rule "
                f"({', '.join(r for r in SELECTION_RULES if r != 'all')}) or set ratio=1.0"
            )
        if not 0.0 < self.entropy_clip_quantile <= 1.0:
            raise OPDConfigError(
                f"opd.token_selection.entropy_clip_quantile={self.entropy_clip_quantile} must lie in (0, 1]"
            )
        if self.entropy_threshold is not None and not 0.0 <= self.entropy_threshold <= 1.0:
            raise OPDConfigError(
                f"opd.token_selection.entropy_threshold={self.entropy_threshold}: the normalised entropy "
                "H / log V lies in [0, 1] (null: the median)"
            )
        if self.divergence_threshold is not None and self.divergence_threshold < 0:
            raise OPDConfigError(
                f"opd.token_selection.divergence_threshold={self.divergence_threshold} must be >= 0 (null: the median)"
            )
        if self.sample_pairs < 0:
            raise OPDConfigError(
                f"opd.token_selection.sample_pairs={self.sample_pairs} must be >= 0 (0: off)"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> TokenSelection:
        return _from_mapping(cls, mapping, "opd.token_selection")

    @property
    def score(self) -> str:
        """What the scoring pass computes for every token (``opd.distill.head.SCORES``)."""
        if self.rule in ("all", *_RULES_NEEDING_DIVERGENCE) or self.full_diagnostics:
            return "full"
        return "entropy" if self.rule == "entropy" else "none"

    @property
    def active(self) -> bool:
        """Whether tokens are dropped at all (a scoring pass runs)."""
        return self.rule != "all"


@dataclass(frozen=True)
class SampleWeighting:
    """``opd.sample_weighting.*``: one weight per rollout row, computed on the driver over the whole batch.

    Rows of weight 0 (with ``paced``: prompts the student always or never solves) are dropped before the
    teacher phase: neither model runs on them (``opd/teacher_tokens_saved``)."""

    method: str = "auto"  # one of SAMPLE_WEIGHTINGS
    alpha: float = 1.0  # paced: exponent of p
    beta: float = 1.0  # paced: exponent of 1 - p
    normalise: str = "mean"  # one of WEIGHT_NORMALISERS

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f"sample_weighting.{f.name}", getattr(self, f.name), f.type)
        _one_of("sample_weighting.method", self.method, SAMPLE_WEIGHTINGS)
        _one_of("sample_weighting.normalise", self.normalise, WEIGHT_NORMALISERS)
        for name in ("alpha", "beta"):
            if getattr(self, name) < 0:
                raise OPDConfigError(
                    f"opd.sample_weighting.{name}={getattr(self, name)} must be >= 0 "
                    "(w(p) = p^alpha (1 - p)^beta; PACED's default is 1)"
                )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> SampleWeighting:
        return _from_mapping(cls, mapping, "opd.sample_weighting")


@dataclass(frozen=True)
class Stage:
    """One stage of ``opd.schedule.stages``: ``loss_type`` until ``until`` (exclusive; null: to the end)."""

    loss_type: str
    until: float | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Stage:
        return _from_mapping(cls, mapping, "opd.schedule.stages[]")


@dataclass(frozen=True)
class Schedule:
    """``opd.schedule.*``: the divergence per training step, in stages (PACED: forward KL, then reverse KL).

    Empty ``stages``: ``opd.loss_type`` throughout. Otherwise the stages replace ``opd.loss_type``: step s
    (1-based, as verl counts) is in the first stage whose ``until`` is above s (``unit=step``) or above
    (s - 1) / total_steps (``unit=fraction``); the last stage has ``until: null``."""

    stages: tuple = ()  # of Stage
    unit: str = "fraction"  # one of SCHEDULE_UNITS

    def __post_init__(self) -> None:
        stages = tuple(
            s if isinstance(s, Stage) else Stage.from_mapping(_as_mapping(s, "opd.schedule.stages[]"))
            for s in (self.stages or ())
        )
        object.__setattr__(self, "stages", stages)
        _one_of("schedule.unit", self.unit, SCHEDULE_UNITS)
        for i, stage in enumerate(stages):
            _check_type(f"schedule.stages[{i}].loss_type", stage.loss_type, "str")
            _check_type(f"schedule.stages[{i}].until", stage.until, "float | None")
            _one_of(f"schedule.stages[{i}].loss_type", stage.loss_type, DIVERGENCES)
            last = i == len(stages) - 1
            if last != (stage.until is None):
                raise OPDConfigError(
                    f"opd.schedule.stages[{i}].until={stage.until}: every stage but the last ends at an `until`, "
                    "and the last runs to the end (until: null), e.g. "
                    "[{loss_type: forward_kl, until: 0.3}, {loss_type: reverse_kl}]"
                )
        bounds = [s.until for s in stages[:-1]]
        for i, until in enumerate(bounds):
            if self.unit == "fraction" and not 0.0 < until < 1.0:
                raise OPDConfigError(
                    f"opd.schedule.stages[{i}].until={until}: with unit=fraction a stage ends at a fraction of "
                    "training in (0, 1) (or set opd.schedule.unit=step and give a step)"
                )
            if self.unit == "step" and (until != int(until) or until < 2):
                raise OPDConfigError(
                    f"opd.schedule.stages[{i}].until={until}: with unit=step a stage ends at a whole step >= 2 "
                    "(steps count from 1: until 2 means step 1 only)"
                )
            if i and until <= bounds[i - 1]:
                raise OPDConfigError(
                    f"opd.schedule.stages[{i}].until={until} must be above the previous stage's ({bounds[i - 1]})"
                )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Schedule:
        return _from_mapping(cls, mapping, "opd.schedule")

    def stage_at(self, step: int, total_steps: int | None) -> int:
        """The index of the stage training step ``step`` (1-based) is in; -1 without stages."""
        if not self.stages:
            return -1
        if self.unit == "fraction":
            if not total_steps:
                raise ValueError("opd.schedule.unit=fraction needs the training's total steps")
            position = (step - 1) / total_steps
        else:
            position = step
        for i, stage in enumerate(self.stages):
            if stage.until is None or position < stage.until:
                return i
        return len(self.stages) - 1

    def loss_type_at(self, step: int, total_steps: int | None, default: str) -> str:
        stage = self.stage_at(step, total_steps)
        return default if stage < 0 else self.stages[stage].loss_type


@dataclass(frozen=True)
class TeacherContext:
    """``opd.teacher_context.*``: privileged context in the teacher's prompt only (self-distillation).

    With ``field`` set, each row's value of that data column (a dotted path into the row, e.g.
    ``reward_model.ground_truth``) is put into the teacher's copy of the prompt's last user message through
    ``template``; the student sees the plain prompt, and both score the same response tokens."""

    field: str | None = None
    template: str = "{prompt}\n\nFor reference, the correct final answer is {context}."

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f"teacher_context.{f.name}", getattr(self, f.name), f.type)
        if self.field is not None:
            if not self.field.strip():
                raise OPDConfigError(
                    "opd.teacher_context.field is empty: name a data column or set it to null"
                )
            for placeholder in ("{prompt}", "{context}"):
                if placeholder not in self.template:
                    raise OPDConfigError(
                        f"opd.teacher_context.template={self.template!r} has no {placeholder}: the template "
                        "rewrites the last user message as e.g. '{prompt}\\n\\nThe answer is {context}.'"
                    )
            try:
                self.template.format(prompt="", context="")
            except (KeyError, IndexError, ValueError) as error:
                raise OPDConfigError(
                    f"opd.teacher_context.template={self.template!r} does not format with only {{prompt}} and "
                    f"{{context}} ({error!r}); write a literal brace as {{{{ or }}}}"
                ) from error

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> TeacherContext:
        return _from_mapping(cls, mapping, "opd.teacher_context")

    @property
    def active(self) -> bool:
        return self.field is not None


@dataclass(frozen=True)
class OPDConfig:
    """Every ``opd.*`` key. Defaults equal ``src/opd/config/opd_trainer.yaml``'s."""

    teacher: str = "model"  # one of TEACHERS
    teacher_path: str | None = None  # teacher=model: a HF model dir sharing the student's tokenizer
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
    token_selection: TokenSelection = dataclasses.field(
        default_factory=lambda: TokenSelection()
    )  # opd.token_selection.*
    sample_weighting: SampleWeighting = dataclasses.field(default_factory=lambda: SampleWeighting())
    schedule: Schedule = dataclasses.field(default_factory=lambda: Schedule())
    teacher_context: TeacherContext = dataclasses.field(default_factory=lambda: TeacherContext())
    rollouts: str = "student"  # one of ROLLOUT_SOURCES

    def __post_init__(self) -> None:
        for name, group in (
            ("token_selection", TokenSelection),
            ("sample_weighting", SampleWeighting),
            ("schedule", Schedule),
            ("teacher_context", TeacherContext),
        ):
            value = getattr(self, name)
            if isinstance(value, Mapping):  # the YAML group, as a dict or a DictConfig
                object.__setattr__(self, name, group.from_mapping(value))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _one_of("teacher", self.teacher, TEACHERS)
        _one_of("loss_type", self.loss_type, DIVERGENCES)
        _one_of("teacher_signal", self.teacher_signal, SIGNALS)
        _one_of("rollouts", self.rollouts, ROLLOUT_SOURCES)
        if self.rollouts == "stored" and self.teacher_signal == "sampled":
            raise OPDConfigError(
                "opd.rollouts=stored with opd.teacher_signal=sampled: the sampled signal estimates the reverse KL "
                "from tokens the student itself sampled, and stored tokens were sampled by another model (biased); "
                "use an exact signal: teacher_signal=hidden (or logits, topk)"
            )
        if self.teacher == "self" and self.teacher_path is not None:
            raise OPDConfigError(
                f"opd.teacher=self (a frozen copy of the initial student) with opd.teacher_path={self.teacher_path}: "
                "unset the path (opd.teacher_path=null, or unset TEACHER_MODEL_PATH), or use opd.teacher=model"
            )
        _one_of("overlong", self.overlong, OVERLONG_POLICIES)
        _one_of("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        scheduled = [
            (f"opd.schedule.stages[{i}].loss_type", s.loss_type) for i, s in enumerate(self.schedule.stages)
        ]
        for name, loss_type in scheduled or [("opd.loss_type", self.loss_type)]:
            if loss_type not in SUPPORTED[self.teacher_signal]:
                modes = [m for m, kinds in SUPPORTED.items() if loss_type in kinds]
                raise OPDConfigError(
                    f"{name}={loss_type} is not supported with opd.teacher_signal={self.teacher_signal} "
                    f"(it supports {list(SUPPORTED[self.teacher_signal])}); use teacher_signal in {modes}"
                )
        if scheduled and self.loss_type not in [t for _, t in scheduled]:
            raise OPDConfigError(
                f"opd.loss_type={self.loss_type} is in no stage of opd.schedule (the stages replace it): set "
                f"opd.loss_type to one of the stages' divergences ({sorted({t for _, t in scheduled})}), so "
                "logs and run names say a divergence the run uses"
            )
        weighting = self.sample_weighting
        if weighting.method == "reward_softmax" and self.reward_beta <= 0:
            raise OPDConfigError(
                f"opd.sample_weighting.method=reward_softmax needs opd.reward_beta > 0 (the softmax "
                f"temperature), got {self.reward_beta}"
            )
        if weighting.method in ("none", "paced") and self.reward_beta > 0:
            raise OPDConfigError(
                f"opd.reward_beta={self.reward_beta} turns on reward weighting, but opd.sample_weighting.method="
                f"{weighting.method}: set opd.reward_beta=0 (or OPD_REWARD_BETA=0), or method=reward_softmax"
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
        rule = self.token_selection.rule
        if self.teacher_signal == "sampled" and rule in _RULES_NEEDING_DIVERGENCE:
            raise OPDConfigError(
                f"opd.token_selection.rule={rule} ranks tokens by their divergence"
                + (" (forward KL)" if rule == "q3" else "")
                + ", but teacher_signal=sampled gives only a one-token estimate of it; use teacher_signal=hidden "
                "(exact, or logits/topk), or rule=entropy/random"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> OPDConfig:
        """From the ``opd:`` group (a dict or a DictConfig); an unknown key is refused with the known ones."""
        return _from_mapping(cls, mapping, "opd")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def weighting(self) -> str:
        """The weighting in effect (``auto`` resolved)."""
        method = self.sample_weighting.method
        if method == "auto":
            return "reward_softmax" if self.reward_beta > 0 else "none"
        return method

    @property
    def loss_types(self) -> tuple[str, ...]:
        """Every divergence the run optimises (the schedule's stages, or ``loss_type``)."""
        return tuple(dict.fromkeys(s.loss_type for s in self.schedule.stages)) or (self.loss_type,)


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
    n = int(rollout.get("n", 1) or 1)
    if opd.weighting == "paced" and n < 2:
        raise OPDConfigError(
            f"opd.sample_weighting.method=paced weighs each prompt by its pass rate over its rollout.n samples, "
            f"but actor_rollout_ref.rollout.n={n} (every pass rate would be 0 or 1: weight 0); set "
            "actor_rollout_ref.rollout.n >= 2 (PACED reportedly uses 8)"
        )
    if opd.rollouts == "stored" and n != 1:
        raise OPDConfigError(
            f"opd.rollouts=stored trains on the stored responses, one per row of the rollouts file, but "
            f"actor_rollout_ref.rollout.n={n} would repeat each {n} times; set actor_rollout_ref.rollout.n=1 "
            "(store more samples per prompt instead: VAL_N / val_kwargs.n of the rollouts stage)"
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


def _as_mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise OPDConfigError(
            f"{name}={value!r} must be a mapping such as {{loss_type: forward_kl, until: 0.3}}"
        )
    return value


def _from_mapping(cls, mapping: Mapping[str, Any], group: str):
    known = {f.name for f in dataclasses.fields(cls)}
    values = {key: mapping[key] for key in mapping}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OPDConfigError(
            f"unknown {group} key(s) {unknown}: the known keys are {sorted(known)} "
            "(see src/opd/config/opd_trainer.yaml)"
        )
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise OPDConfigError(f"{group} needs the key(s) {missing} (see src/opd/config/opd_trainer.yaml)")
    return cls(**values)


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
        "TokenSelection": isinstance(value, TokenSelection),
        "SampleWeighting": isinstance(value, SampleWeighting),
        "Schedule": isinstance(value, Schedule),
        "TeacherContext": isinstance(value, TeacherContext),
        "tuple": isinstance(value, tuple),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
    }[base]
    if not ok:
        raise OPDConfigError(f"opd.{name}={value!r} must be a {base}")
