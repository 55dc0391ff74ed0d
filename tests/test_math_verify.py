"""Tests for rlax_llm.rewards.math (GSM8K / MATH verifiers) and .latex."""

import fractions
import json
import os
import threading
import time

import numpy as np
import pytest
import sympy

from rlax_llm.rewards import latex
from rlax_llm.rewards import math as rm

_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
_GSM8K = os.path.join(_DATA, "gsm8k", "test.jsonl")
_MATH500 = os.path.join(_DATA, "math500", "test.jsonl")


def _rows(path):
  if not os.path.exists(path):
    pytest.skip(f"{path} is missing; the shared data directory ships GSM8K "
                "and MATH-500 beside the repository.")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# ---------------------------------------------------------------- GSM8K --


@pytest.mark.parametrize("text,expected", [
    ("so she makes 9 * 2 = $18 a day.\n#### 18", 18),
    ("#### 1,234", 1234),
    ("#### -5", -5),
    ("The answer is $1,000.00.", 1000),
    ("the answer is 18.0", 18),
    ("THE ANSWER IS -3 apples", -3),
    ("It grows by 50%.", 50),
    ("She had 5-3 left, i.e. 2", 2),
    ("computing 5-3", 3),  # A minus after a digit is an operator.
    ("first 7 then 8", 8),
    ("half: 3/4", fractions.Fraction(3, 4)),
    ("price \\boxed{\\$42} total 7", 42),
    ("#### 12\nThe answer is 13.", 12),  # '####' wins over later phrases.
    ("The answer is 13.\n#### nothing", 13),  # No number after '####'.
    ("costs .5 dollars", fractions.Fraction(1, 2)),
    ("\u22127 degrees", -7),  # Unicode minus.
])
def test_extract_gsm8k(text, expected):
  assert rm.extract_gsm8k(text) == expected


def test_extract_gsm8k_no_number():
  assert rm.extract_gsm8k("no digits here") is None


@pytest.mark.parametrize("completion,answer,expected", [
    ("#### 18", "18", 1.0),
    ("#### 18.00", 18, 1.0),
    ("#### $1,000", "1,000", 1.0),
    ("The answer is 1000", "#### 1,000", 1.0),
    ("The answer is 0.5", "1/2", 1.0),
    ("#### 17", "18", 0.0),
    ("#### 18", "-18", 0.0),
    ("#### 18", None, 0.0),
    ("#### 18", True, 0.0),
    ("#### 18", np.int64(18), 1.0),
])
def test_verify_gsm8k(completion, answer, expected):
  assert rm.verify(completion, answer, style="gsm8k") == expected


def test_unknown_style_scores_zero_and_batch_rejects_it():
  assert rm.verify("#### 1", "1", style="gsm") == 0.0
  with pytest.raises(ValueError, match="style must be one of"):
    rm.batch_verify(["#### 1"], ["1"], style="gsm")


def test_batch_verify():
  got = rm.batch_verify(["#### 1", "#### 2", r"\boxed{3}"], ["1", "3", "3"],
                        style="gsm8k")
  assert got.dtype == np.float32 and got.tolist() == [1.0, 0.0, 1.0]
  with pytest.raises(ValueError, match="one answer per completion"):
    rm.batch_verify(["a"], [], style="math")


def test_gsm8k_test_split_labels():
  """Every reference solution verifies against its label (independently
  parsed), also rephrased as 'The answer is n.'; shifted labels fail."""
  rows = _rows(_GSM8K)
  assert len(rows) == 1319
  extracted = rephrased = shifted = 0
  for row in rows:
    body, label = row["answer"].rsplit("####", 1)
    want = int(label.strip().replace(",", ""))
    extracted += rm.extract_gsm8k(row["answer"]) == want
    alt = body.rstrip() + f"\nThe answer is {label.strip()}."
    rephrased += rm.verify(alt, want, style="gsm8k") == 1.0
    shifted += rm.verify(row["answer"], want + 1, style="gsm8k") == 0.0
  assert extracted == rephrased == shifted == len(rows)


# ----------------------------------------------------------------- MATH --


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \fbox{2}", "2"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed {a{b}c}", "a{b}c"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{unclosed", None),
    ("none", None),
])
def test_last_boxed(text, expected):
  assert rm.last_boxed(text) == expected


_EQUIVALENCE_CASES = [
    # Fractions, mixed numbers, decimals.
    (r"\frac12", "0.5", True),
    (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
    (r"\frac 34", "3/4", True),
    (r"1\frac{4}{5}", r"\frac{9}{5}", True),
    (r"2^3\frac{1}{2}", "4", True),  # Not a mixed number: a product.
    (".0000672", r"6.72 \times 10^{-5}", True),
    ("0.15", "0.150", True),
    (r"\frac{1}{3}", "0.333", False),
    # Radicals, pi, complex numbers, functions.
    (r"2\sqrt{5}", r"\sqrt{20}", True),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt3}", True),
    (r"\sqrt{2}", "1.41421356", False),
    (r"\pi", "3.14159", False),
    (r"12\pi", r"12 \pi", True),
    ("-2 + 7i", "7i-2", True),
    (r"\cot x", r"\frac{\cos x}{\sin x}", True),
    (r"\sin^2 x + \cos^2 x", "1", True),
    (r"\log_2 8", "3", True),
    (r"\sqrt[3]{27}", "3", True),
    ("2^10", "1024", True),
    # Polynomials.
    ("x^2+2x+1", "(x+1)^2", True),
    ("(a+5)(b+2)", "ab+2a+5b+10", True),
    ("(a+5)(b+2)", "ab+2a+5b+11", False),
    # Tuples and intervals: order and brackets matter.
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)", True),
    (r"(3, \pi/2)", r"(\pi/2, 3)", False),
    ("(1,2)", "[1,2]", False),
    ("[1,2)", "[1,2]", False),
    ("(1,2]", "(1, 2]", True),
    (r"(-\infty, 0]", r"(-\infty,0]", True),
    (r"(-\infty, 2) \cup (3, \infty)", r"(3,\infty)\cup(-\infty,2)", True),
    (r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2]\cup(3,\infty)", False),
    # Unordered lists and plus-minus.
    ("1, 2", "2, 1", True),
    ("1,2", "1,3", False),
    ("1, 2", "1, 2, 2", False),
    (r"\{1\pm\sqrt{5},-2\}", r"-2, 1+\sqrt5, 1-\sqrt 5", True),
    (r"1 \pm \sqrt{19}", r"1-\sqrt{19}, 1+\sqrt{19}", True),
    # Matrices and vectors.
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}",
     r"\begin{bmatrix}-1&0\\0&-1\end{bmatrix}", True),
    (r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}",
     r"\left(\frac15, -\frac{18}{5}\right)", True),
    (r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}",
     r"\begin{pmatrix} 1/5 \\ 18/5 \end{pmatrix}", False),
    (r"\begin{pmatrix} 1 & 2 \end{pmatrix}",
     r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", False),
    # Equations.
    ("x=5", "5", True),
    ("5", "x = 5", True),
    ("x=5", "y=5", False),
    (r"x \in [-2,7]", "[-2,7]", True),
    ("y = 2x+3", "2x - y + 3 = 0", True),
    ("y=2x+3", "y=2x+4", False),
    ("5x - 7y + 11z + 4 = 0", "-5x+7y-11z-4=0", True),
    # Text, units, degrees, percent, money, separators, bases.
    (r"\text{(B)}", "B", True),
    (r"\textbf{(B)}", "(C)", False),
    (r"\text{Evelyn}", "evelyn", True),
    (r"\text{east}", "seat", False),
    (r"15\mbox{ cm}^2", "15", True),
    (r"864 \mbox{ inches}^2", "864", True),
    (r"5.4 \text{ cents}", "5.4", True),
    (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}", True),
    (r"90^\circ", "90", True),
    (r"90^{\circ}", "90", True),
    (r"50\%", "50", True),
    (r"\$18.90", "18.9", True),
    (r"\$32,\!348", "32348", True),
    ("10,080", r"10,\!080", True),
    (r"11,\! 111,\! 111,\! 100", "11111111100", True),
    ("3.", "3", True),
    ("204_5", "204_{5}", True),
    ("204_5", "54", False),
]


@pytest.mark.parametrize("candidate,reference,expected", _EQUIVALENCE_CASES)
def test_is_equivalent(candidate, reference, expected):
  assert rm.is_equivalent(candidate, reference) is expected
  # Through verify, the candidate is boxed inside a completion.
  completion = f"Work... so the answer is $\\boxed{{{candidate}}}$."
  assert rm.verify(completion, reference, style="math") == float(expected)


def test_is_equivalent_is_symmetric():
  for candidate, reference, expected in _EQUIVALENCE_CASES:
    if "text" in candidate or "text" in reference:
      continue  # The word rule looks at the reference only.
    assert rm.is_equivalent(reference, candidate) is expected, (
        candidate, reference)


def test_math_requires_a_box():
  assert rm.verify("The answer is 5.", "5", style="math") == 0.0
  assert rm.verify(r"\boxed{5}", r"Solution: \boxed{5}.", style="math") == 1.0


def test_math500_reference_solutions():
  """The last box of each solution is judged equivalent to the answer."""
  rows = _rows(_MATH500)
  assert len(rows) == 500
  failures = [r["answer"] for r in rows
              if rm.verify(r["solution"], r["answer"], style="math") != 1.0]
  assert len(failures) <= 5, failures  # >= 99 %.
  # Every answer parses (the structural path is exercised, not only the
  # string comparison).
  unparsed = []
  for row in rows:
    try:
      latex.parse(rm.normalize(row["answer"]))
    except latex.ParseError:
      unparsed.append(row["answer"])
  assert not unparsed, unparsed


def test_math500_rewritten_and_wrong_answers():
  """For each expression answer a: '2(a) - (a)' is right, '(a) + 1' wrong;
  and a neighbouring problem's answer is wrong unless it is the same."""
  rows = _rows(_MATH500)
  checked = right = wrong = 0
  for row in rows:
    a = row["answer"]
    norm = rm.normalize(a)
    if "," in a or rm._is_word(norm):  # pylint: disable=protected-access
      continue
    if not isinstance(latex.parse(norm), sympy.Expr):
      continue
    checked += 1
    right += rm.verify(f"\\boxed{{2\\left({a}\\right)-\\left({a}\\right)}}",
                       a, style="math") == 1.0
    wrong += rm.verify(f"\\boxed{{\\left({a}\\right)+1}}", a,
                       style="math") == 0.0
  assert checked > 400
  assert right == wrong == checked
  answers = [r["answer"] for r in rows]
  accepted = [(answers[i - 1], a) for i, a in enumerate(answers)
              if rm.is_equivalent(answers[i - 1], a)]
  # Only the pairs that really are the same answer.
  assert sorted(accepted) == [("3", "3"), ("5", "x=5"), ("7", "7")]


def _render(value):
  """Independent LaTeX rendering of a parsed value (sympy's own printer)."""
  if isinstance(value, sympy.Basic):
    return sympy.latex(value)
  if isinstance(value, latex.Bracketed):
    return value.left + ", ".join(map(_render, value.items)) + value.right
  if isinstance(value, latex.Collection):
    return ", ".join(map(_render, value.items))
  if isinstance(value, latex.Union):
    return r" \cup ".join(map(_render, value.parts))
  if isinstance(value, latex.Matrix):
    rows = [" & ".join(map(_render, r)) for r in value.rows]
    return r"\begin{pmatrix}" + r" \\ ".join(rows) + r"\end{pmatrix}"
  assert isinstance(value, latex.Relation)
  op = " = " if value.op == "=" else r" \in "
  return _render(value.lhs) + op + _render(value.rhs)


def test_math500_sympy_printer_round_trip():
  rows = _rows(_MATH500)
  failures = []
  for row in rows:
    norm = rm.normalize(row["answer"])
    if rm._is_word(norm):  # pylint: disable=protected-access
      continue
    printed = _render(latex.parse(norm))
    if rm.is_equivalent(printed, row["answer"]) is not True:
      failures.append((row["answer"], printed))
  assert not failures, failures


# --------------------------------------------------------------- parser --


@pytest.mark.parametrize("text,expected", [
    (r"\frac12", sympy.Rational(1, 2)),
    (r"\frac{3}{4}", sympy.Rational(3, 4)),
    ("0.15", sympy.Rational(3, 20)),
    ("2^10", sympy.Integer(1024)),
    ("2^{-2}", sympy.Rational(1, 4)),
    (r"1\frac{1}{2}", sympy.Rational(3, 2)),
    (r"3\sqrt{2}", 3 * sympy.sqrt(2)),
    ("2xy", 2 * sympy.Symbol("x") * sympy.Symbol("y")),
    ("i^2", sympy.Integer(-1)),
    (r"\alpha_1", sympy.Symbol("alpha_1")),
    ("-x^2", -sympy.Symbol("x")**2),
    ("2^3^2", sympy.Integer(512)),  # Right-associative.
])
def test_parse_values(text, expected):
  assert sympy.simplify(latex.parse(text) - expected) == 0


def test_parse_containers():
  assert latex.parse("(1, 2]") == latex.Bracketed(
      "(", (sympy.Integer(1), sympy.Integer(2)), "]")
  assert latex.parse("(5)") == sympy.Integer(5)
  got = latex.parse(r"1 \pm 2")
  assert isinstance(got, latex.Collection)
  assert sorted(got.items) == [-1, 3]
  got = latex.parse(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}")
  assert got == latex.Matrix(((1, 2), (3, 4)))
  got = latex.parse("x = 3")
  assert got == latex.Relation("=", sympy.Symbol("x"), sympy.Integer(3))


@pytest.mark.parametrize("text", [
    "10^10^10^10",
    "10^{10^{10^{10}}}",
    "(2^{1000})^{1000}",
    "9^{9^9}",
    "x^{100000}",
    "(" * 200 + "1" + ")" * 200,
    "{" * 10_000 + "1" + "}" * 10_000,
    "__import__('os').system('touch /tmp/x')",
    "1" * (latex.MAX_CHARS + 1),
    r"\frac{1}{0}",
    r"\begin{pmatrix} 1 & 2 \\ 3 \end{pmatrix}",
    r"\unknown{3}",
    "",
    "1 +",
])
def test_parse_rejects(text):
  start = time.perf_counter()
  with pytest.raises(latex.ParseError):
    latex.parse(text)
  assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------- time limits --


def test_time_limit_interrupts_python_loop():
  start = time.perf_counter()
  with pytest.raises(rm.TimeLimitExceeded):
    with rm.time_limit(0.2) as armed:
      assert armed
      while True:
        pass
  assert time.perf_counter() - start < 2.0


def test_time_limit_is_not_armed_off_the_main_thread():
  results = []
  thread = threading.Thread(
      target=lambda: results.append(rm.time_limit(0.1).__enter__()))
  thread.start()
  thread.join()
  assert results == [False]


# ---------------------------------------------------------- adversarial --

_PWNED = "/tmp/rlax_llm_math_pwned"
_ADVERSARIAL = {
    "1MB": "7" * 1_000_000,
    "1MB boxed": "\\boxed{" + "7" * 1_000_000 + "}",
    "nested braces": "\\boxed{" + "{" * 10_000 + "7" + "}" * 10_000 + "}",
    "nested parens": "\\boxed{" + "(" * 5000 + "7" + ")" * 5000 + "}",
    "power tower": "\\boxed{10^10^10^10}",
    "braced tower": "\\boxed{10^{10^{10^{10}}}}",
    "big symbolic power": "\\boxed{(x+1)^{1000} - (x+2)^{1000}}",
    "import": f"\\boxed{{__import__('os').system('touch {_PWNED}')}}",
    "eval": f"#### eval(\"open('{_PWNED}', 'w')\")",
    "surrogate": "\\boxed{8}\udcff #### 8",
    "bytes": b"\\boxed{8} #### 8",
    "empty": "",
    "none": None,
    "long sum": "\\boxed{" + "+".join(["x"] * 800) + "}",
}


@pytest.mark.parametrize("name", sorted(_ADVERSARIAL))
@pytest.mark.parametrize("style", rm.STYLES)
def test_adversarial_inputs_score_zero_fast(name, style):
  if os.path.exists(_PWNED):
    os.remove(_PWNED)
  start = time.perf_counter()
  assert rm.verify(_ADVERSARIAL[name], "8", style=style) == 0.0
  assert time.perf_counter() - start < rm.TIME_LIMIT_S + 1.0
  assert not os.path.exists(_PWNED)


def test_adversarial_answers_score_zero():
  assert rm.verify(r"\boxed{8}", b"8", style="math") == 0.0
  assert rm.verify(r"\boxed{8}", "8\udcff", style="math") == 0.0
  assert rm.verify(r"\boxed{8}", "10^10^10^10", style="math") == 0.0
  assert rm.verify("#### 8", "8" * 2000, style="gsm8k") == 0.0


class _HostileStr(str):

  def strip(self, *args):
    raise RuntimeError("hostile")

  def __len__(self):
    return 3


def test_hostile_str_subclass():
  assert rm.verify(_HostileStr(r"\boxed{8}"), "8", style="math") == 1.0
  assert rm.verify(_HostileStr("#### 9"), "8", style="gsm8k") == 0.0
