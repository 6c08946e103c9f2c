"""On-policy distillation losses: per-token student-teacher divergences and the teacher signals they read."""

from opd.distill.losses import (
    DIVERGENCES,
    REDUCTIONS,
    SUPPORTED,
    aligned_vocab_size,
    reduce_divergence,
    token_divergence,
)
from opd.distill.teacher_signal import MODES, TeacherSignal

__all__ = [
    "DIVERGENCES",
    "MODES",
    "REDUCTIONS",
    "SUPPORTED",
    "TeacherSignal",
    "aligned_vocab_size",
    "reduce_divergence",
    "token_divergence",
]
