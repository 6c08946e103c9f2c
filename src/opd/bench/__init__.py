"""Benchmarks: runnable comparisons that print tables and write JSON under outputs/bench (not tests)."""
