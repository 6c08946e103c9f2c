"""A test reward (verl's ``reward.custom_reward_function``): 1.0 for responses of even character length.

Why: reward weighting only shows when a batch holds rewarded and unrewarded samples; the tiny student solves
about 6% of its problems when sampling, so 16 samples are all unrewarded about a third of the time. Parity of
the length mixes rewards in every batch of 16 except with probability 2 / 2**16."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    return float(len(solution_str) % 2 == 0)
