"""Fuzz tests of the verifiers over hostile model text.

The LaTeX parser (`rewards.latex`), the MATH and GSM8K verifiers
(`rewards.math`) and the Countdown verifier (`rewards.countdown`) get
generated adversarial strings: deep nesting, huge exponents and exponent
towers, factorial towers, unbalanced braces, arbitrary unicode (lone
surrogates included) and inputs of up to 1 MB. Each verifier must return
0.0 or 1.0, never raise, run nothing (no `eval`/`exec`, no sympy string
parsing, no process) and finish within `HANG_GUARD_S`, which is a guard
against hangs and quadratic blow-ups (a correct call takes milliseconds),
not a performance threshold. Generated expressions with a known value must
also score 1.0 against that value and 0.0 against another, so the verifiers
cannot pass by scoring everything 0.

The module prints how many verifier calls ran and the slowest one.
"""

import builtins
import contextlib
import fractions
import os
import subprocess
import threading
import time

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest
import sympy.parsing.sympy_parser as sympy_parser

from rlax_llm.rewards import countdown
from rlax_llm.rewards import latex
from rlax_llm.rewards import math as math_rewards

# Twice the verifiers' own time limit (math.TIME_LIMIT_S), and over ten
# times the slowest correct call on a busy machine: only a hang or a
# super-linear blow-up on a long input gets near it.
HANG_GUARD_S = 2 * math_rewards.TIME_LIMIT_S

_STATS = {"cases": 0, "slowest_s": 0.0, "slowest": ""}

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  print(f"\nverifier fuzz: {_STATS['cases']} verifier calls, slowest "
        f"{_STATS['slowest_s']:.3f} s ({_STATS['slowest']})")


class _Executed(AssertionError):
  pass


@contextlib.contextmanager
def _nothing_may_run(calls):
  """Replaces the ways text could be run with recorders that refuse."""
  saved = []

  def refuse(name, original):
    def fn(*args, **kwargs):
      if name.startswith("builtins.") and args and not isinstance(
          args[0], (str, bytes)):
        return original(*args, **kwargs)  # imports run compiled modules
      calls.append((name, repr(args)[:200]))
      raise _Executed(f"{name} called with {args!r:.200}")
    return fn

  targets = [(builtins, "eval"), (builtins, "exec"), (os, "system"),
             (os, "popen"), (subprocess, "Popen"),
             (sympy_parser, "eval_expr"), (sympy_parser, "parse_expr")]
  for module, name in targets:
    original = getattr(module, name)
    saved.append((module, name, original))
    setattr(module, name, refuse(f"{module.__name__}.{name}", original))
  try:
    yield
  finally:
    for module, name, fn in saved:
      setattr(module, name, fn)


def _call(label, fn, *args, **kwargs):
  """Runs one verifier call under the guards; returns its result."""
  calls = []
  t0 = time.perf_counter()
  with _nothing_may_run(calls):
    out = fn(*args, **kwargs)
  dt = time.perf_counter() - t0
  _STATS["cases"] += 1
  if dt > _STATS["slowest_s"]:
    _STATS["slowest_s"] = dt
    _STATS["slowest"] = f"{label} on {len(repr(args[0]))} chars"
  assert not calls, calls
  assert dt < HANG_GUARD_S, f"{label} took {dt:.1f} s on {args[0]!r:.300}"
  return out


def _check_all_verifiers(text):
  """Every verifier on `text` (as completion, box content and reference)."""
  for completion, answer in ((text, "1"), (f"\\boxed{{{text}}}", "1"),
                             ("\\boxed{1}", text), (f"\\boxed{{{text}}}", text)):
    got = _call("math.verify", math_rewards.verify, completion, answer,
                style="math")
    assert got in (0.0, 1.0) and isinstance(got, float)
  for completion in (text, f"#### {text}", f"The answer is {text}"):
    got = _call("gsm8k.verify", math_rewards.verify, completion, "12",
                style="gsm8k")
    assert got in (0.0, 1.0) and isinstance(got, float)
  got = _call("gsm8k.verify(reference)", math_rewards.verify, "#### 12",
              text, style="gsm8k")
  assert got in (0.0, 1.0)
  for completion in (text, f"<answer>{text}</answer>"):
    got = _call("countdown.verify", countdown.verify, completion,
                [3, 5, 7, 25], 24)
    assert got in (0.0, 1.0) and isinstance(got, float)
  try:
    _call("latex.parse", latex.parse, text)
  except latex.ParseError:
    pass  # the parser's one way of refusing; anything else is a bug


# -- generators of hostile text --------------------------------------------

_ATOMS = [
    "\\frac", "\\dfrac", "\\sqrt", "{", "}", "(", ")", "[", "]", "\\{", "\\}",
    "^", "_", "!", "+", "-", "*", "/", "=", ",", "&", "\\\\", "\\pm", "\\mp",
    "\\cdot", "\\times", "\\div", "\\infty", "\\pi", "\\left(", "\\right)",
    "\\begin{pmatrix}", "\\end{pmatrix}", "\\boxed{", "\\fbox{", "\\text{",
    "\\mbox{ cm}", "\\cup", "\\in", "\\sin", "\\log", "\\ln", "\\exp", "x",
    "y", "e", "i", "0", "1", "9", "99999999999999999999", ".5", "1,000",
    "10^{10^{10}}", "9!", "!!", "####", "the answer is", "$", "%", "\\%",
    "\\,", "\\!", "\\", " ", "\n", "\u221a", "\u03c0", "\u00b1", "\u221e",
    "\u00d7", "\u00f7", "\u2212", "\u200b", "\ud800", "\U0001f600",
    "<answer>", "</answer>", "__import__('os').system('true')", "1e308",
    "nan", "oo", "zoo", "I", "Symbol", "lambda:0",
]

_atoms_text = st.lists(st.sampled_from(_ATOMS), max_size=60).map("".join)


@st.composite
def _nested(draw):
  opener, closer = draw(st.sampled_from([
      ("{", "}"), ("(", ")"), ("[", "]"), ("\\frac{1}{", "}"),
      ("\\sqrt{", "}"), ("2^{", "}"), ("\\boxed{", "}"), ("\\sin(", ")"),
      ("\\text{", "}"), ("\\left(", "\\right)"), ("-(", ")"),
      ("\\begin{pmatrix}", "\\end{pmatrix}")]))
  depth = draw(st.integers(1, 3000))
  core = draw(st.sampled_from(["1", "x", "", "2+3", "\\pi"]))
  cut = draw(st.integers(0, depth))  # unbalanced: drop some closers
  return opener * depth + core + closer * (depth - cut)


@st.composite
def _towers(draw):
  base = draw(st.sampled_from(["2", "10", "9", "x", "e", "\\pi", "1.0001",
                               "-8", "0", "(1+\\sqrt{2})", "\\frac{1}{3}"]))
  height = draw(st.integers(1, 60))
  exponent = draw(st.sampled_from(
      ["9", "99", "999", "1000", "1001", "-1000", "10^{1000}",
       "9" * 400, "\\frac{1}{1000}", "0.5", "\\pi", "x"]))
  kind = draw(st.sampled_from(["braced", "bare", "factorial", "mixed"]))
  if kind == "braced":
    return f"{base}^{{" * height + exponent + "}" * height
  if kind == "bare":
    return "^".join([base] * height + [exponent])
  if kind == "factorial":
    return "(" * height + f"{exponent}!" + ")!" * height
  return f"{base}^{{{exponent}}}" + "!" * height + f"^{{{exponent}}}"


_text = st.one_of(
    _atoms_text,
    _nested(),
    _towers(),
    st.text(max_size=300),  # arbitrary unicode
    st.tuples(_atoms_text, st.text(max_size=50), _towers()).map("".join),
)


@FUZZ
@given(_text)
def test_hostile_text_scores_zero_or_one_and_runs_nothing(text):
  _check_all_verifiers(text)


# Inputs at and past the size caps: a run of one thing, long enough that
# a quadratic step would take minutes.
_LARGE = {
    "1MB_digits": "9" * 1_000_000,
    "1MB_braces": "{" * 1_000_000,
    "1MB_boxed_sum": "\\boxed{" + "1+" * 500_000 + "1}",
    "1MB_gsm8k": "#### " + "1," * 500_000,
    "1MB_answer_tags": "<answer>" * 131_072,
    "100k_answer_tags": "<answer>" * 12_500,
    "99k_boxed_spaces": "\\boxed{1" + " " * 98_000 + "x}",
    "99k_spaces_unit": "\\boxed{1" + " " * 98_000 + "cm}",
    "99k_open_boxes": "\\boxed{" * 14_000,
    "99k_text_cmds": "\\boxed{" + "\\text{a}" * 12_000 + "}",
    "99k_nested_text": "\\boxed{" + "\\text{" * 16_000 + "}",
    "99k_thousands": "\\boxed{" + "1," * 49_000 + "1}",
    "99k_answer_is": "the answer is " * 7_000,
    "99k_minus": "- " * 49_000,
    "99k_slashes": "1 /" * 33_000,
    "99k_countdown_parens": "<answer>" + "(" * 49_000 + "1" + ")" * 49_000
                            + "</answer>",
    "99k_countdown_line": "1+" * 49_000 + "1",
    "99k_degrees": "\\boxed{" + "^\\circ" * 16_000 + "}",
    "99k_unicode": "\u03c0\u221a\u00b1\ud800" * 24_000,
    "long_exponent_digits": "\\boxed{2^{" + "9" * 1900 + "}}",
    "sin_of_huge": "\\boxed{\\sin(10^{1000})}",
}


@pytest.mark.parametrize("name", sorted(_LARGE))
def test_large_inputs_stay_bounded(name):
  _check_all_verifiers(_LARGE[name])


@pytest.mark.parametrize("name", ["99k_boxed_spaces", "99k_spaces_unit",
                                  "99k_text_cmds", "sin_of_huge",
                                  "long_exponent_digits", "99k_thousands"])
def test_math_verify_bounded_without_the_alarm(name):
  # Off the main thread no SIGALRM limit can be set: the caps alone must
  # bound the cost (as in a reward thread of another program).
  out = []
  thread = threading.Thread(
      target=lambda: out.append(math_rewards.verify(_LARGE[name], "1",
                                                    style="math")),
      daemon=True)
  t0 = time.perf_counter()
  thread.start()
  thread.join(HANG_GUARD_S)
  assert not thread.is_alive(), f"{name}: still running after {HANG_GUARD_S} s"
  assert out and out[0] in (0.0, 1.0)
  _STATS["cases"] += 1
  _STATS["slowest_s"] = max(_STATS["slowest_s"], time.perf_counter() - t0)


@pytest.mark.parametrize("completion,answer,want", [
    # 98k spaces inside the box: "1 x" is 1*x.
    ("\\boxed{1" + " " * 98_000 + "x}", "x", 1.0),
    ("\\boxed{2" + " " * 98_000 + "\\text{ cm}}", "2", 1.0),
    ("\\boxed{3" + "\n" * 98_000 + "}", "3", 1.0),
])
def test_long_inputs_keep_their_math_verdict(completion, answer, want):
  assert _call("math.verify", math_rewards.verify, completion, answer,
               style="math") == want


def test_long_inputs_keep_their_countdown_verdict():
  # Unclosed tags do not count; the last line is the expression.
  text = "<answer>" * 12_400 + "\n(25 - 5) * 4 / 2"
  assert _call("countdown.verify", countdown.verify, text, [25, 5, 4, 2],
               40) == 1.0
  assert _call("countdown.verify", countdown.verify, text + "</answer>",
               [25, 5, 4, 2], 40) == 0.0  # one pair: all of it, not a number


def test_model_text_is_never_run(tmp_path):
  marker = tmp_path / "ran"
  payloads = [
      f"__import__('os').system('touch {marker}')",
      f"exec(\"open('{marker}', 'w')\")",
      f"Symbol('x').__class__.__init__.__globals__['os'].system('touch {marker}')",
      f"lambda: open('{marker}', 'w')",
  ]
  for p in payloads:
    for wrapped in (p, f"\\boxed{{{p}}}", f"#### {p}", f"<answer>{p}</answer>"):
      _check_all_verifiers(wrapped)
  assert not marker.exists()


# -- generated expressions with a known value ----------------------------------


@st.composite
def _expression(draw, depth=0):
  """(text, exact value, literals) of a random + - * expression."""
  if depth >= 4 or draw(st.integers(0, 2)) == 0:
    n = draw(st.integers(1, 60))
    return str(n), fractions.Fraction(n), [n]
  a = draw(_expression(depth + 1))
  b = draw(_expression(depth + 1))
  op = draw(st.sampled_from("+-*"))
  value = {"+": a[1] + b[1], "-": a[1] - b[1], "*": a[1] * b[1]}[op]
  return f"({a[0]} {op} {b[0]})", value, a[2] + b[2]


@FUZZ
@given(_expression(), st.sampled_from(["", " ", "\n"]))
def test_known_values_score_one_and_others_zero(expr, pad):
  text, value, literals = expr
  target = int(value)
  cd = _call("countdown.verify", countdown.verify,
             f"{pad}<answer>{text}</answer>{pad}", literals, target)
  assert cd == 1.0
  assert _call("countdown.verify", countdown.verify,
               f"<answer>{text}</answer>", literals, target + 1) == 0.0
  latex_text = text.replace("*", "\\cdot")
  assert _call("math.verify", math_rewards.verify,
               f"so {pad}\\boxed{{{latex_text}}}", str(target),
               style="math") == 1.0
  assert _call("math.verify", math_rewards.verify,
               f"\\boxed{{{latex_text}}}", str(target + 1),
               style="math") == 0.0
  assert _call("gsm8k.verify", math_rewards.verify,
               f"{text}{pad}\n#### {target:,}", str(target),
               style="gsm8k") == 1.0
  assert _call("gsm8k.verify", math_rewards.verify, f"#### {target + 1}",
               str(target), style="gsm8k") == 0.0
  parsed = latex.parse(latex_text)
  assert parsed == target
