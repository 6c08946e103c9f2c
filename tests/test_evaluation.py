"""Eval metrics (``opd.evaluation``): pass@k and maj@k against brute-force enumeration, table, ties."""

from __future__ import annotations

import itertools
import random
from math import comb

import pytest

from opd.evaluation import default_ks, format_table, maj_at_k, majority_correct, pass_at_k, summarize


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample(n):
    for correct in range(n + 1):
        samples = [True] * correct + [False] * (n - correct)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, correct, k) == pytest.approx(expected), (n, correct, k)


def test_default_ks_are_powers_of_two_and_n():
    assert default_ks(1) == [1]
    assert default_ks(2) == [1, 2]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(12) == [1, 2, 4, 8, 12]


def test_majority_vote_ignores_empty_answers_and_breaks_ties_by_first_seen():
    assert majority_correct([("", False), ("", False), ("7", True)])
    assert not majority_correct([("", False), ("", False)])
    assert majority_correct([("3", True), ("4", False)])  # tie: first seen wins
    assert not majority_correct([("4", False), ("3", True)])
    assert not majority_correct([("3", True), ("4", False), ("4", False)])


def test_maj_at_k_is_exact_when_all_subsets_are_enumerated():
    samples = [("1", True), ("2", False), ("2", False), ("1", True), ("3", False)]
    for k in range(1, 6):
        subsets = list(itertools.combinations(samples, k))
        expected = sum(majority_correct(list(s)) for s in subsets) / len(subsets)
        assert comb(5, k) <= 200
        assert maj_at_k(samples, k, draws=200, rng=random.Random(0)) == pytest.approx(expected)


def test_maj_at_k_sampling_is_seeded_and_close_to_exact():
    rng = random.Random(1)
    samples = [(str(rng.randint(0, 3)), False) for _ in range(16)]
    samples = [(p, p == "0") for p, _ in samples]
    exact = sum(majority_correct(list(s)) for s in itertools.combinations(samples, 8)) / comb(16, 8)
    estimate = maj_at_k(samples, 8, draws=2000, rng=random.Random(0))
    assert estimate == maj_at_k(samples, 8, draws=2000, rng=random.Random(0))
    assert abs(estimate - exact) < 0.05


def test_summarize_per_source_and_problem():
    records = [
        {"data_source": "math", "uid": "a", "acc": 1.0, "pred": "1"},
        {"data_source": "math", "uid": "a", "acc": 0.0, "pred": "2"},
        {"data_source": "math", "uid": "b", "acc": 0.0, "pred": "5"},
        {"data_source": "math", "uid": "b", "acc": 0.0, "pred": ""},
        {"data_source": "aime24", "uid": "c", "acc": 1, "pred": "9"},
        {"data_source": "aime24", "uid": "c", "acc": 1, "pred": "9"},
    ]
    summary = summarize(records)
    assert list(summary) == ["aime24", "math"]
    math = summary["math"]
    assert math["problems"] == 2 and math["n"] == 2
    assert math["mean@2"] == pytest.approx(0.25)
    assert math["pass@1"] == pytest.approx(0.25)
    assert math["pass@2"] == pytest.approx(0.5)  # problem a has one correct sample of two
    assert math["maj@2"] == pytest.approx(0.5)  # a: tie 1 vs 2, first seen (correct) wins
    assert summary["aime24"]["mean@2"] == 1.0
    table = format_table(summary)
    lines = table.splitlines()
    assert lines[0].split() == ["data", "source", "problems", "mean@2", "pass@1", "pass@2", "maj@1", "maj@2"]
    assert lines[3].split() == ["math", "2", "25.0", "25.0", "50.0", "25.0", "50.0"]


def test_unequal_sample_counts_are_refused():
    records = [
        {"data_source": "math", "uid": "a", "acc": 1, "pred": "1"},
        {"data_source": "math", "uid": "b", "acc": 1, "pred": "1"},
        {"data_source": "math", "uid": "b", "acc": 1, "pred": "1"},
    ]
    with pytest.raises(ValueError, match="different sample counts"):
        summarize(records)
