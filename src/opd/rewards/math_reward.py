"""Math answer reward: 1.0 when the last ``\\boxed{...}`` is mathematically equivalent to the ground truth.

Exact match undercounts real math data (``0.5`` vs ``\\frac12``, ``5 \\text{ cm}`` vs ``5``, ``2, 1`` vs
``1, 2``), so answers are compared in two steps: a cheap normalised comparison (strings, exact rationals)
and, only when that cannot decide, symbolic equivalence with math-verify. Conventions: units, degree
signs and percent signs are annotations (``50\\%`` == ``50``, not ``0.5``); a leading ``x =`` is dropped;
comma-separated answers are sets (``1, 2`` == ``2, 1``) while brackets keep order and openness; rationals
compare exactly (``0.333`` != ``1/3``); words compare as case-insensitive text.

Symbolic checks run in a helper process, never in the caller: sympy can take unbounded time on a
pathological answer (``9^{9^{9^{9^{9}}}}``), and math-verify's own guard, ``signal.alarm``, works only in
the main thread (verl calls rewards from worker threads; elsewhere math-verify raises), has whole-second
resolution, and cannot fire during one long C-level call such as a huge integer power. The helper imports math-verify once and forks a child per check that it SIGKILLs at
the deadline, so every check returns in about ``_CHECK_TIMEOUT_S`` from any thread, and an
unanswerable check counts as incorrect. POSIX only (fork).

``is_equivalent`` is the one home of answer equivalence; ``opd.rewards.math_dapo`` reuses it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

from opd.rewards.boxed import last_boxed

_CHECK_TIMEOUT_S = 0.5  # per symbolic check; typical checks take 10-150 ms
_REPLY_MARGIN_S = 2.0  # the helper kills its child at the deadline; beyond this margin the helper is lost
_STARTUP_TIMEOUT_S = 120.0  # importing sympy and math-verify on a loaded node
_MAX_HELPERS = min(8, os.cpu_count() or 1)  # concurrent symbolic checks (about 65 MB of memory each)
_MAX_SYMBOLIC_CHARS = 1000  # longer answers are junk; MATH-500's longest is 159 characters
_SRC_DIR = str(Path(__file__).resolve().parents[2])

# --------------------------------------------------------------------------- normalisation
# Every pattern is linear in the input: answers come from a policy under training and can be anything.

_UNITS = (
    r"(?:(?:square|sq\.?|cubic|cu\.?)\s+)?"
    r"(?:units?|cm|mm|km|met(?:er|re)s?|inch(?:es)?|feet|foot|ft|yards?|miles?|mph|degrees?|dollars?|"
    r"cents?|hours?|minutes?|seconds?|days?|weeks?|months?|years?|pounds?|grams?|kg|lit(?:er|re)s?|"
    r"percent|ways|points?|students?|people)"
)
_AFTER_VALUE = r"(?<=[\d}])\s*"  # a unit follows a number or a closing brace (``\frac{1}{2} cm``)
_SUPERSCRIPT = r"(?:\^\{?[23]\}?)?"
# Any \text{...} words after a value are an annotation ("5 \text{ apples}"); bare words only when a unit.
_TRAILING_TEXT = re.compile(
    _AFTER_VALUE + r"\\(?:text|textrm|textnormal|mbox)\s*\{[A-Za-z. ]*\}" + _SUPERSCRIPT + "$"
)
_TRAILING_UNIT = re.compile(_AFTER_VALUE + _UNITS + r"\.?" + _SUPERSCRIPT + "$")
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textrm|textnormal|textbf|textit|mbox|mathrm|mathbf|mathit)\s*\{([^{}]*)\}"
)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree\b|°")
_PERCENT = re.compile(r"\\?%$")
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![A-Za-z])")
# Spacing commands and the math delimiters \( \) \[ \]; a matrix row break "\\\\" is matched as one token so
# that its second backslash never starts one of them ("\\\\ 2" keeps its row break).
_SPACING = re.compile(r"\\\\|\\[,!;:()\[\]]|\\ |~|\\q?quad(?![A-Za-z])")
_WIDE_SPACES = ("\\ ", "~", "\\quad", "\\qquad")
_ASSIGNMENT = re.compile(  # "x =", "k=", "\theta =", "f(x) =", "x \in" before an answer without another "="
    r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?(?:\([^()=]*\))? ?(?:=|\\in(?![A-Za-z])) ?(?=[^=]*$)"
)
_CONJUNCTION = re.compile(r" (?:and|or) ")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\{[^{}]*\}")
_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_REPEATING = re.compile(r"([-+]?)(\d*)\.(\d*)\\overline\{(\d+)\}")  # 0.1\overline{6} = 1/6
_SLASH = re.compile(r"([-+]?\d+)/([-+]?\d+)")
_FRAC = re.compile(r"([-+]?)\\frac\{([-+]?\d+(?:\.\d+)?)\}\{([-+]?\d+(?:\.\d+)?)\}")


def _respace(match: re.Match[str]) -> str:
    token = match[0]
    if token == "\\\\":
        return token
    return " " if token in _WIDE_SPACES else ""  # thin spaces go, also inside numbers: 1\,000


def _strip_outer_braces(s: str) -> str:
    """``{5}`` -> ``5``, but ``{a}{b}`` stays."""
    if not (s.startswith("{") and s.endswith("}")):
        return s
    depth = 0
    for i, ch in enumerate(s):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return s[1:-1].strip() if i == len(s) - 1 else s
    return s


def _normalize(answer: str) -> str:
    """A canonical spelling that keeps the mathematics: used for the string comparison and for math-verify."""
    s = last_boxed(answer) or answer  # a ground truth written as "\boxed{...}"
    s = s.replace("−", "-").replace("∞", "\\infty").replace("π", "\\pi")
    s = s.replace("\\$", "").replace("$", "")
    s = _SIZING.sub("", s)
    s = _SPACING.sub(_respace, s)
    s = s.replace("\\displaystyle", "").replace("{,}", ",")
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    # TeX shorthand: \frac12, \frac1{x}, \frac{x}2, \sqrt2
    s = re.sub(r"\\frac\s*([0-9A-Za-z])\s*([0-9A-Za-z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9A-Za-z])\s*(?=\{)", r"\\frac{\1}", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*([0-9A-Za-z])", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)
    s = _DEGREES.sub("", s)
    s = " ".join(s.split())  # one space between tokens from here on
    s = _PERCENT.sub("", s).rstrip()
    s = _TRAILING_TEXT.sub("", s).rstrip()
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = " ".join(s.split())
    s = _TRAILING_UNIT.sub("", s).rstrip()
    s = _CONJUNCTION.sub(", ", s)
    s = _strip_outer_braces(s)
    s = _ASSIGNMENT.sub("", s)
    s = re.sub(r"(?<!\.)\.$", "", s).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _rational(compact: str) -> Fraction | None:
    """The exact value of a plain or repeating decimal, ``a/b`` or ``\\frac{a}{b}``; None for anything else."""
    try:
        if _DECIMAL.fullmatch(compact):
            return Fraction(compact)
        if match := _REPEATING.fullmatch(compact):
            sign, whole, fixed, repeating = match.groups()
            value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
            value += Fraction(int(repeating), (10 ** len(repeating) - 1) * 10 ** len(fixed))
            return -value if sign == "-" else value
        if match := _SLASH.fullmatch(compact):
            return Fraction(int(match[1]), int(match[2]))
        if match := _FRAC.fullmatch(compact):
            value = Fraction(match[2]) / Fraction(match[3])
            return -value if match[1] == "-" else value
    except (ValueError, ZeroDivisionError):  # 0 denominators, numbers past int's digit limit
        return None
    return None


def _bracket_kind(compact: str) -> str | None:
    if compact.startswith("\\{") and compact.endswith("\\}"):
        return "set"
    if compact.startswith(("(", "[")) and compact.endswith((")", "]")):
        return "tuple or interval"
    return None


def is_equivalent(pred: str, truth: str) -> bool:
    """Whether the answer ``pred`` equals the ground truth ``truth``; bounded in time, never raises on strings."""
    pred, truth = _normalize(pred), _normalize(truth)
    compact_pred, compact_truth = re.sub(r"\s+", "", pred), re.sub(r"\s+", "", truth)
    if not compact_pred or not compact_truth:
        return False
    if compact_pred == compact_truth:
        return True
    pred_value, truth_value = _rational(compact_pred), _rational(compact_truth)
    if pred_value is not None and truth_value is not None:
        return pred_value == truth_value
    if _WORD.search(_ENVIRONMENT.sub("", pred + " " + truth)):
        # Words ("Monday", "no solution"): math-verify would read them as products of letter symbols.
        return compact_pred.lower() == compact_truth.lower()
    kinds = {_bracket_kind(compact_pred), _bracket_kind(compact_truth)}
    if kinds == {"set", "tuple or interval"}:  # math-verify equates \{1,2\} with (1,2)
        return False
    if max(len(pred), len(truth)) > _MAX_SYMBOLIC_CHARS:
        return False
    return _HELPERS.check(truth, pred)


def compute_score(
    data_source: str | None = None,
    solution_str: str = "",
    ground_truth: str = "",
    extra_info: dict | None = None,
    **kwargs: object,
) -> dict[str, float | str]:
    """verl reward-function signature; ``score`` = ``acc`` = 1.0 when the last boxed answer is correct."""
    return score_answer(last_boxed(solution_str) or "", ground_truth)


def score_answer(pred: str, ground_truth: object) -> dict[str, float | str]:
    """The reward dict every math reward returns for an extracted answer ("" when there is none)."""
    correct = bool(pred) and is_equivalent(pred, str(ground_truth))
    return {"score": float(correct), "acc": float(correct), "pred": pred}


# --------------------------------------------------------------------------- symbolic helper process


def _math_verify_equal(truth: str, pred: str) -> bool:
    """math-verify's verdict, unguarded: called only in a forked child of the helper."""
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # units=False: math-verify strips one-letter "units" (2m == 2, 3t == 3); _normalize handles units.
    latex = LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
        )
    )
    config = [latex, ExprExtractionConfig()]
    gold = parse("\\boxed{" + truth + "}", config, parsing_timeout=None)
    target = parse("\\boxed{" + pred + "}", config, parsing_timeout=None)
    return verify(gold, target, timeout_seconds=None)


def _check_in_child(truth: str, pred: str) -> bool:
    """Run one check in a forked child; SIGKILL it at the deadline (no answer counts as not equal)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            verdict = b"1" if _math_verify_equal(truth, pred) else b"0"
        except BaseException:  # any failure in the child is a "no"
            verdict = b"0"
        os.write(write_fd, verdict)
        os._exit(0)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], _CHECK_TIMEOUT_S)
    verdict = os.read(read_fd, 1) if ready else b""
    os.close(read_fd)
    os.kill(pid, signal.SIGKILL)  # harmless when it has already exited
    os.waitpid(pid, 0)
    return verdict == b"1"


# Parsing and comparing grow caches (antlr's prediction DFA, sympy's lazy imports) that a forked child
# would rebuild on every check: the helper exercises the common answer shapes once before it forks.
_WARM_UP = [
    ("\\frac{1}{2}", "0.5"),
    ("-3", "3"),
    ("12", "1.5"),
    ("(x+1)^2", "x^2+2x+1"),
    ("3t", "3"),
    ("2x+3", "y=2x+3"),
    ("a", "b"),
    ("x=5", "5"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("\\pi", "3.14"),
    ("2^{10}", "1024"),
    ("(1,2]", "(1, 2]"),
    ("(2,1)", "(1,2)"),
    ("[0,\\infty)", "(-\\infty, 3) \\cup (5, \\infty)"),
    ("\\{1,2\\}", "2,1"),
    ("1, 4", "1, 5"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{bmatrix}1 & 2\\\\3 & 4\\end{bmatrix}"),
    ("3+2i", "\\sin x"),
    ("\\log_2 8", "e^{x}"),
]


def _helper_main() -> None:
    """The helper's loop: one JSON ``[truth, pred]`` per stdin line, one ``1``/``0`` line back."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeouts are off
    for truth, pred in _WARM_UP:
        _math_verify_equal(truth, pred)
    channel, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol
    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        truth, pred = json.loads(line)
        channel.write("1\n" if _check_in_child(truth, pred) else "0\n")
        channel.flush()


class _Helper:
    """The caller's side of one helper process."""

    def __init__(self) -> None:
        pythonpath = os.pathsep.join(p for p in (_SRC_DIR, os.environ.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "opd.rewards.math_reward"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": pythonpath},
            start_new_session=True,  # a Ctrl-C in the terminal is for the caller, which then closes stdin
        )
        self._started = False

    def _reply(self, timeout: float) -> str:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        return self._proc.stdout.readline() if ready else ""

    def check(self, truth: str, pred: str) -> bool | None:
        """The verdict, or None when the helper is lost (it is then killed)."""
        if not self._started:
            if self._reply(_STARTUP_TIMEOUT_S) != "ready\n":
                self.kill()
                raise RuntimeError("the math-verify helper process did not start; its error is on stderr")
            self._started = True
        try:
            self._proc.stdin.write(json.dumps([truth, pred]) + "\n")
            self._proc.stdin.flush()
        except OSError:
            self.kill()
            return None
        reply = self._reply(_CHECK_TIMEOUT_S + _REPLY_MARGIN_S)
        if reply not in ("0\n", "1\n"):
            self.kill()
            return None
        return reply == "1\n"

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()


class _HelperPool:
    """Idle helpers shared by the caller's threads: at most ``_MAX_HELPERS``, started on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adopt()

    def _adopt(self) -> None:
        """Start empty: at import, and in a forked caller, whose inherited pipes belong to its parent."""
        self._pid = os.getpid()
        self._idle: list[_Helper] = []
        self._slots = threading.BoundedSemaphore(_MAX_HELPERS)

    def check(self, truth: str, pred: str) -> bool:
        with self._lock:
            if self._pid != os.getpid():
                self._adopt()
            slots = self._slots
        with slots:
            with self._lock:
                helper = self._idle.pop() if self._idle else None
            helper = helper or _Helper()
            verdict = helper.check(truth, pred)
            if verdict is None:
                return False
            with self._lock:
                self._idle.append(helper)
            return verdict

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for helper in idle:
                helper.kill()


_HELPERS = _HelperPool()
atexit.register(_HELPERS.close)

if __name__ == "__main__":
    _helper_main()
