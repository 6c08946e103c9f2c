"""Math answer rewards: a table of equivalent and non-equivalent answers, bounded time, any thread.

The expected values are the mathematical truth under the documented conventions (units, degrees and
percent signs are annotations: ``50\\%`` == ``50``); when math-verify disagrees, the normalisation in
``opd.rewards.math_reward`` is fixed, never the table.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from opd.rewards import math_dapo, math_reward

T, F = True, False

# (answer inside \boxed{}, ground truth, equivalent)
MATH_CASES = [
    # integers and signs
    ("42", "42", T),
    ("-7", "-7", T),
    ("-7", "7", F),
    ("12", "21", F),
    ("0", "0", T),
    ("100", "1000", F),
    ("+5", "5", T),
    ("007", "7", T),
    ("1.0", "1", T),
    ("−3", "-3", T),
    ("1.00001", "1", F),
    ("-0", "0", T),
    # fractions and decimals
    ("0.5", "\\frac{1}{2}", T),
    ("\\frac{1}{2}", "0.5", T),
    ("1/2", "\\frac{1}{2}", T),
    ("\\dfrac{1}{2}", "\\frac12", T),
    ("\\tfrac{3}{4}", "0.75", T),
    ("\\frac12", "1/2", T),
    ("\\frac{2}{4}", "\\frac{1}{2}", T),
    (".5", "\\frac12", T),
    ("2.50", "\\frac{5}{2}", T),
    ("\\frac{10}{4}", "2.5", T),
    ("1.25", "\\frac{5}{4}", T),
    ("3/4", "0.75", T),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", T),
    ("-0.5", "-\\dfrac12", T),
    ("\\frac{1}{3}", "0.\\overline{3}", T),
    ("0.1\\overline{6}", "\\frac{1}{6}", T),
    ("\\frac{x}{2}", "0.5x", T),
    ("\\frac{\\,3\\,}{4}", "0.75", T),
    ("0.51", "\\frac{1}{2}", F),
    ("0.333", "\\frac{1}{3}", F),
    ("\\frac{1}{2}", "-\\frac{1}{2}", F),
    ("\\frac{3}{2}", "\\frac{2}{3}", F),
    ("1.2", "\\frac{5}{4}", F),
    ("\\frac{a}{b}", "\\frac{b}{a}", F),
    ("\\frac{1}{0}", "1", F),
    # units
    ("5 \\text{ cm}", "5", T),
    ("5\\text{cm}", "5", T),
    ("5", "5\\text{ cm}", T),
    ("10 meters", "10", T),
    ("10 \\text{ meters}", "10", T),
    ("6 \\text{ square units}", "6", T),
    ("12 \\text{ cm}^2", "12", T),
    ("3 inches", "3", T),
    ("15 \\mbox{ dollars}", "15", T),
    ("\\frac{9}{2} \\text{ cm}", "4.5", T),
    ("20 \\mathrm{cm}", "20", T),
    ("7 \\text{ apples}", "7", T),
    ("4 \\text{ cm}", "5", F),
    ("2 \\text{ hours}", "3", F),
    ("2m", "2", F),  # a variable, not metres
    ("3", "3t", F),
    # degrees
    ("90^\\circ", "90", T),
    ("90^{\\circ}", "90", T),
    ("45", "45^\\circ", T),
    ("30 \\text{ degrees}", "30", T),
    ("120°", "120", T),
    ("30^\\circ", "60^\\circ", F),
    ("\\frac{\\pi}{3}", "\\frac{\\pi}{6}", F),
    # percent
    ("50\\%", "50", T),
    ("50", "50\\%", T),
    ("12.5\\%", "12.5", T),
    ("50 \\text{ percent}", "50", T),
    ("25\\%", "50", F),
    # thousands separators
    ("1,000", "1000", T),
    ("1{,}000", "1000", T),
    ("1\\,000", "1000", T),
    ("1000", "1,000", T),
    ("12,345", "12345", T),
    ("1,000,000", "10^6", T),
    ("1\\,000\\,000", "1000000", T),
    ("1,000", "100", F),
    ("1,001", "1000", F),
    # text answers
    ("\\text{Monday}", "Monday", T),
    ("\\textbf{Monday}", "\\text{Monday}", T),
    ("\\text{no solution}", "\\text{No solution}", T),
    ("\\text{(B)}", "B", T),
    ("\\text{Tuesday}", "\\text{Monday}", F),
    ("\\text{dynamo}", "\\text{Monday}", F),  # same letters: not a product of symbols
    ("\\text{east}", "\\text{seat}", F),
    ("\\text{(A)}", "B", F),
    ("\\text{even}", "\\text{odd}", F),
    # leading "x =" and friends
    ("x = 5", "5", T),
    ("k=3", "3", T),
    ("5", "x=5", T),
    ("x = -2", "-2", T),
    ("y = 2x + 3", "2x+3", T),
    ("\\theta = 30^\\circ", "30", T),
    ("f(x) = x^2", "x^2", T),
    ("x \\in [1, 2]", "[1,2]", T),
    ("x=4", "5", F),
    ("n = 10", "11", F),
    # intervals
    ("(1, 2]", "(1,2]", T),
    ("[0,\\infty)", "[0, \\infty)", T),
    ("\\left[ 0, 1 \\right)", "[0,1)", T),
    ("[-2, 2]", "[-2,2]", T),
    ("(-\\infty, 3) \\cup (5, \\infty)", "(-\\infty,3)\\cup(5,\\infty)", T),
    ("(1,2)", "[1,2]", F),
    ("[1,2]", "(1,2)", F),
    ("[1,2)", "[1,2]", F),
    ("(1,2]", "[1,2)", F),
    ("(-\\infty,3]\\cup[5,\\infty)", "(-\\infty,3)\\cup(5,\\infty)", F),
    ("(-\\infty, 0)", "(0, \\infty)", F),
    # tuples and ordered pairs
    ("(1, 2)", "(1,2)", T),
    ("\\left( 1, 2 \\right)", "(1,2)", T),
    ("(3, -1)", "(3,-1)", T),
    ("(1, 2, 3)", "(1,2,3)", T),
    ("\\left(\\frac{1}{2}, 3\\right)", "(0.5, 3)", T),
    ("(2, 1)", "(1,2)", F),
    ("(-1, 3)", "(3,-1)", F),
    ("(1, 3, 2)", "(1,2,3)", F),
    ("(0.5, 3)", "(\\frac12, 4)", F),
    ("\\{1,2\\}", "(1,2)", F),
    # matrices and vectors
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", T),
    ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", T),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", T),
    ("\\begin{pmatrix} \\frac{1}{2} \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix}0.5\\\\-1\\end{pmatrix}", T),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", F),
    ("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", F),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix}1&0\\\\1&0\\end{pmatrix}", F),
    # sets of solutions: order does not matter
    ("1, 2", "2, 1", T),
    ("\\{1, 2\\}", "\\{2, 1\\}", T),
    ("-1, 3", "3, -1", T),
    ("1, 2, 3", "3, 2, 1", T),
    ("1 \\text{ and } 2", "1, 2", T),
    ("1 \\text{ or } 2", "2, 1", T),
    ("x = 1, 2", "2, 1", T),
    ("\\frac{1}{2}, -3", "-3, \\frac12", T),
    ("1, 2", "1, 3", F),
    ("1", "1, 2", F),
    ("1, 2", "1, 2, 3", F),
    # square roots
    ("2\\sqrt{2}", "\\sqrt{8}", T),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", T),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}", T),
    ("\\sqrt3", "\\sqrt{3}", T),
    ("\\sqrt{3}", "3^{1/2}", T),
    ("\\sqrt{12}", "2\\sqrt{3}", T),
    ("5\\sqrt{2}", "\\sqrt{50}", T),
    ("\\sqrt{2}", "\\sqrt{3}", F),
    ("2\\sqrt{3}", "3\\sqrt{2}", F),
    ("1.414", "\\sqrt{2}", F),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{3}", F),
    # pi
    ("2\\pi", "2 \\pi", T),
    ("\\frac{\\pi}{2}", "\\frac12\\pi", T),
    ("\\pi r^2", "r^2\\pi", T),
    ("\\pi", "3.14", F),
    ("3.14159", "\\pi", F),
    ("4\\pi", "\\pi", F),
    # algebra
    ("x^2+2x+1", "(x+1)^2", T),
    ("x+1", "1+x", T),
    ("x^3-1", "(x-1)(x^2+x+1)", T),
    ("a+b", "b+a", T),
    ("x-1", "1-x", F),
    ("2x+3", "3x+2", F),
    # complex numbers
    ("3+2i", "3+2i", T),
    ("4+3i", "3i+4", T),
    ("3-2i", "3+2i", F),
    # powers
    ("2^{10}", "1024", T),
    ("10^{-2}", "0.01", T),
    ("2^{10}", "1000", F),
    # LaTeX wrappers and spacing
    ("\\!5", "5", T),
    ("$5$", "5", T),
    ("\\$5", "5", T),
    ("5", "\\$5", T),
    ("\\(5\\)", "5", T),
    ("\\displaystyle \\frac{1}{2}", "0.5", T),
    ("\\left(\\frac{3}{4}\\right)", "0.75", T),
    ("{5}", "5", T),
    ("5.", "5", T),
    ("7", "\\boxed{7}", T),
    ("\\infty", "\\infty", T),
    ("-\\infty", "\\infty", F),
]


def _solution(answer: str) -> str:
    return f"We simplify step by step.\nThus the final answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize(
    ("answer", "truth", "expected"), MATH_CASES, ids=[f"{a} | {t}" for a, t, _ in MATH_CASES]
)
def test_math_reward_table(answer, truth, expected):
    result = math_reward.compute_score("math", _solution(answer), truth)
    assert result == {"score": float(expected), "acc": float(expected), "pred": answer}


@pytest.mark.parametrize(
    ("solution", "pred"),
    [
        ("\\boxed 5", "5"),
        ("so \\fbox{5} it is", "5"),
        ("first \\boxed{3}, then \\boxed{5}", "5"),
        ("\\boxed{\\frac{5}{1}}", "\\frac{5}{1}"),
        ("\\boxed{{5}}", "{5}"),
    ],
)
def test_math_reward_box_forms(solution, pred):
    assert math_reward.compute_score(solution_str=solution, ground_truth="5") == {
        "score": 1.0,
        "acc": 1.0,
        "pred": pred,
    }


@pytest.mark.parametrize(
    ("solution", "truth", "pred"),
    [
        ("", "5", ""),
        ("The answer is 5.", "5", ""),
        ("\\boxed{}", "5", ""),
        ("\\boxed{5", "5", ""),  # unbalanced
        ("\\boxed", "5", ""),
        ("\\boxed{5}", "", "5"),
        ("\\boxed{ }", " ", " "),
        ("\\boxed{\\text{}}", "", "\\text{}"),
    ],
)
def test_math_reward_no_answer_scores_zero(solution, truth, pred):
    assert math_reward.compute_score(solution_str=solution, ground_truth=truth) == {
        "score": 0.0,
        "acc": 0.0,
        "pred": pred,
    }


def test_math_reward_non_string_ground_truth():
    assert math_reward.compute_score(solution_str="\\boxed{42}", ground_truth=42)["score"] == 1.0


# (solution in the DAPO format, ground truth, equivalent, extracted answer)
DAPO_CASES = [
    ("Reasoning.\nAnswer: 42", "42", T, "42"),
    ("answer: 42", "42", T, "42"),
    ("ANSWER:42", "42", T, "42"),
    ("Answer: $42$", "42", T, "42"),
    ("Answer: \\boxed{42}", "42", T, "42"),
    ("Answer: $\\boxed{42}$", "42", T, "42"),
    ("Answer: 1\nmore thought\nAnswer: 42", "42", T, "42"),
    ("**Answer:** 42", "42", T, "42"),
    ("Answer: 42.", "42", T, "42"),
    ("Answer: \\frac{1}{2}", "0.5", T, "\\frac{1}{2}"),
    ("Answer: 1/2", "\\frac{1}{2}", T, "1/2"),
    ("Answer: 1,000", "1000", T, "1,000"),
    ("Answer: 50\\%", "50", T, "50\\%"),
    ("Answer: x = 3", "3", T, "x = 3"),
    ("Answer: (1, 2]", "(1,2]", T, "(1, 2]"),
    ("Answer: $-7$", "-7", T, "-7"),
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}", T, "2\\sqrt{2}"),
    ("Answer: 41", "42", F, "41"),
    ("Answer: 42\nAnswer: 1", "42", F, "1"),
    ("Answer: [1,2]", "(1,2)", F, "[1,2]"),
    ("Answer: 12", "21", F, "12"),
    ("Answer: 7", "-7", F, "7"),
    ("Answer: 0.51", "\\frac{1}{2}", F, "0.51"),
    ("The answer is 42", "42", F, ""),
    ("\\boxed{42}", "42", F, ""),  # DAPO needs the Answer: line
    ("Answer:", "42", F, ""),
    ("", "42", F, ""),
]


def test_case_table_size():
    assert len(MATH_CASES) >= 150
    assert sum(not expected for _, _, expected in MATH_CASES) >= 40
    assert len(DAPO_CASES) >= 20


@pytest.mark.parametrize(("solution", "truth", "expected", "pred"), DAPO_CASES)
def test_math_dapo_table(solution, truth, expected, pred):
    result = math_dapo.compute_score("dapo", solution, truth)
    assert result == {"score": float(expected), "acc": float(expected), "pred": pred}


def test_dapo_and_boxed_share_equivalence():
    for answer, truth, expected in MATH_CASES[::7]:
        assert (
            math_dapo.compute_score(solution_str=f"Answer: {answer}", ground_truth=truth)["acc"] == expected
        )


PATHOLOGICAL = [  # (answer, ground truth)
    ("9^{9^{9^{9^{9}}}}", "1"),
    ("9^{9^{9}}", "2"),
    ("+".join(["x"] * 5000), "1"),  # 10,000 characters
    ("+".join(["x"] * 300), "1"),  # under the length cap, slow in sympy
    ("(" * 300 + "1" + ")" * 300, "1"),  # slow to parse
    ("{" * 5000 + "1" + "}" * 5000, "1"),
    ("1" * 10000 + "x", "1" * 10000),
    ("1" + " " * 10000 + "x", "1"),
    ("\\frac{" * 3000, "1"),
    ("9^{" * 2000 + "9" + "}" * 2000, "1"),
]


@pytest.mark.parametrize("index", range(len(PATHOLOGICAL)))
def test_pathological_inputs_return_within_a_second(index):
    math_reward.compute_score(solution_str="\\boxed{2\\sqrt{2}}", ground_truth="\\sqrt{8}")  # helper started
    answer, truth = PATHOLOGICAL[index]
    for module, solution in ((math_reward, f"\\boxed{{{answer}}}"), (math_dapo, f"Answer: {answer}")):
        start = time.perf_counter()
        result = module.compute_score(solution_str=solution, ground_truth=truth)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"{module.__name__} took {elapsed:.2f} s"
        assert result["score"] == 0.0


def test_symbolic_path_works_from_threads():
    """verl calls rewards from worker threads, where math-verify's own signal-based timeouts fail."""
    cases = [
        ("2\\sqrt{2}", "\\sqrt{8}", T),
        ("x^2+2x+1", "(x+1)^2", T),
        ("1, 2", "2, 1", T),
        ("(2, 1)", "(1,2)", F),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{bmatrix}1\\\\2\\end{bmatrix}", T),
        ("9^{9^{9^{9^{9}}}}", "1", F),
    ] * 2

    def acc(case: tuple[str, str, bool]) -> float:
        answer, truth, _ = case
        assert threading.current_thread() is not threading.main_thread()
        return math_reward.compute_score(solution_str=_solution(answer), ground_truth=truth)["acc"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(acc, cases)) == [float(expected) for _, _, expected in cases]
    assert len(math_reward._HELPERS._idle) <= math_reward._MAX_HELPERS


def test_pathological_input_in_a_thread_returns_within_a_second():
    math_reward.compute_score(solution_str="\\boxed{2\\sqrt{2}}", ground_truth="\\sqrt{8}")  # helper started
    with ThreadPoolExecutor(max_workers=1) as pool:
        start = time.perf_counter()
        result = pool.submit(math_reward.compute_score, "math", "\\boxed{9^{9^{9^{9^{9}}}}}", "1").result()
        elapsed = time.perf_counter() - start
    assert result["score"] == 0.0 and elapsed < 1.0, elapsed


def test_random_strings_never_raise():
    rng = random.Random(0)
    tokens = (
        r"\boxed{ { } \frac \sqrt ^ _ 1 23 x ( ) [ ] , \% $ \text{ cm = \left( \right) \\ \ . - /".split()
    )
    tokens += [" ", "\\overline{", "\\{", "\\,", "°", "−"]

    def junk(length: int) -> str:
        return "".join(rng.choice(tokens) for _ in range(rng.randint(0, length)))

    for _ in range(500):
        math_reward._rational(math_reward._normalize(junk(12)))
    for _ in range(20):
        result = math_reward.compute_score(solution_str="\\boxed{" + junk(10) + "}", ground_truth=junk(6))
        assert result["score"] in (0.0, 1.0)
        result = math_dapo.compute_score(solution_str="Answer: " + junk(10), ground_truth=junk(6))
        assert result["score"] in (0.0, 1.0)
