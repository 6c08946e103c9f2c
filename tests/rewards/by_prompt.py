"""A test reward (verl's ``reward.custom_reward_function``) that fixes each prompt's pass rate by its index.

Why: pass-rate weighting (PACED) only shows when a batch holds prompts the student always solves, never
solves, and solves sometimes; the tiny student rarely solves its problems. Index mod 3: 0 always passes,
1 never, 2 passes for half of the responses by a checksum of their text (mixed over 4 different samples
except with probability 1/8; the tiny student's samples often share their length, so not by length)."""

import zlib


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    kind = int((extra_info or {}).get("index", 0)) % 3
    if kind == 0:
        return 1.0
    if kind == 1:
        return 0.0
    return float(zlib.crc32(solution_str.encode()) % 2 == 0)
