"""Tiny, offline, deterministic assets for CPU tests and demos of on-policy distillation.

Real runs need a hub model, a dataset and a GPU; tests and demos on a laptop or CI runner have none of these.
``build()`` makes a stand-in set locally in a few minutes from a seed: a byte-level BPE tokenizer with a ChatML
template, a 2-digit addition word-problem dataset in verl's parquet format, a small Qwen2 teacher that solves it
(>= 90% val accuracy) and a smaller student that mostly does not (<= 40%) but answers in the same format.
"""

from opd.tiny.builder import build, default_dir, is_complete_build
from opd.tiny.recipe import BUILDER_VERSION, build_key

__all__ = ["BUILDER_VERSION", "build", "build_key", "default_dir", "is_complete_build"]
