"""On-policy distillation: the typed config (``config``, torch-free), divergences (``losses``), teacher
signals, packing, the fused output-head divergence (``head``) and the two-phase step (``step``).

The names below load lazily, so ``opd.distill.config`` stays importable where torch is absent (login nodes).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DIVERGENCES": "opd.distill.config",
    "SUPPORTED": "opd.distill.config",
    "OPDConfig": "opd.distill.config",
    "MODES": "opd.distill.teacher_signal",
    "TeacherSignal": "opd.distill.teacher_signal",
    "REDUCTIONS": "opd.distill.losses",
    "aligned_vocab_size": "opd.distill.losses",
    "reduce_divergence": "opd.distill.losses",
    "token_divergence": "opd.distill.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opd.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
