"""Verifiers for math word problems: GSM8K (numbers) and MATH (LaTeX answers).

``verify(completion, answer, style=...)`` returns 1.0 or 0.0 and never
raises. The completion is model text; nothing in it is ever executed (see
``rlax_llm.rewards.latex`` for the parser that reads it).

Common rules. A completion scores 0.0 when it is not a ``str``, is longer
than ``MAX_COMPLETION_CHARS`` characters, or is not valid Unicode (a lone
surrogate, as left by ``bytes.decode(errors="surrogateescape")``).

GSM8K style (``style="gsm8k"``). The predicted number is taken from the
first of these rules that finds one:

  1. the text after the last ``####`` up to the end of its line;
  2. the content of the last ``\\boxed{...}``;
  3. the text after the last "the answer is" (any case) up to the end of
     its line;
  4. the whole completion.

Within the chosen text the number is the first one for rules 1-3 and the
last one for rule 4. A number is an optional ``-`` sign (one not directly
after a letter, digit or ``)``, so ``5-3`` reads ``3``), an optional ``$``,
digits with optional thousands commas (``1,000``) and decimals, an
optional ``/denominator``, an optional ``%`` (dropped: ``50%`` equals
``50``). Numbers are compared exactly as fractions: ``18.00`` equals
``18``, ``0.5`` equals ``1/2``. The reference may be a number, a numeric
string, or a full solution ending in ``#### n``.

MATH style (``style="math"``). The prediction is the content of the last
``\\boxed{...}`` or ``\\fbox{...}`` (braces matched by a scanner that skips
``\\{`` and ``\\}``); with none the score is 0.0. A reference containing
``\\boxed`` is reduced the same way. Both are normalised (``normalize``):
``$``, ``\\left``/``\\right``, ``\\!``/``\\,`` spacing, degrees
(``^\\circ``), ``%`` and trailing periods are dropped; ``\\dfrac`` and
``\\tfrac`` become ``\\frac``; thousands separators (``10,\\!080``,
``58,500``) are removed; ``\\text{}``/``\\mbox{}``/``\\mathrm{}`` keep
their content, except that words beside other material are units and are
dropped (``15\\mbox{ cm}^2`` is ``15``). Then two answers are equal when

  * their normalised spellings agree (ignoring spaces); or
  * the reference is a word (``\\text{Evelyn}``): the words agree ignoring
    case; or
  * both parse (``latex.parse``) to equivalent values:
    - expressions: structurally equal after sympy's automatic evaluation;
      else without free symbols, exactly equal when both are rational and
      within a relative 1e-12 at 30 digits otherwise (a decimal never
      equals an irrational: ``1.414`` is not ``\\sqrt2``); with symbols,
      equal at 4 seeded random rational points in [0.5, 2.6] (relative
      1e-9; at least 2 points must evaluate); when no point evaluates,
      ``sympy.simplify(a - b) == 0`` decides if the time limit can be
      enforced;
    - ``(a, b]`` and other bracketed lists: same brackets, equal items in
      order (tuples and intervals keep their meaning); a one-row or
      one-column matrix equals a parenthesised tuple of its entries;
    - ``\\{a, b\\}``, top-level comma lists ``a, b`` and ``a \\pm b``: equal
      as multisets, in any order ("Enter all solutions, separated by
      commas" is the MATH convention for lists without brackets);
    - unions of intervals: the parts as multisets; matrices: same shape,
      equal entries;
    - ``x = 5`` against ``5``: an equation or ``\\in`` whose left side is a
      lone symbol is compared by its right side; two equations are equal
      when the left sides are the same symbol and the right sides agree,
      or when ``lhs - rhs`` of one is a non-zero constant multiple of the
      other's (``y = 2x + 3`` equals ``2x - y + 3 = 0``).

Time limit. Parsing and comparing run under ``TIME_LIMIT_S`` seconds. In
the main thread of a process with ``signal.setitimer`` (and no interval
timer already running) a ``SIGALRM`` alarm interrupts sympy wherever it is
in Python code, and the score is 0.0. Elsewhere no alarm is set: the
symbolic ``simplify`` fallback is skipped and only the bounded steps run
(the parser's caps bound their cost). ``RewardRunner`` adds a hard
per-item process timeout on top of both.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import fractions
import random
import re
import signal
import threading
from typing import Any

import numpy as np
import sympy

from rlax_llm.rewards import latex

__all__ = [
    "MAX_COMPLETION_CHARS",
    "STYLES",
    "TIME_LIMIT_S",
    "batch_verify",
    "extract_gsm8k",
    "is_equivalent",
    "last_boxed",
    "normalize",
    "parse_number",
    "time_limit",
    "verify",
]

MAX_COMPLETION_CHARS = 100_000
TIME_LIMIT_S = 2.0
STYLES = ("gsm8k", "math")

_NUM_POINTS = 4
_REL_TOL_SYMBOLIC = sympy.Float("1e-9", 30)
_REL_TOL_NUMERIC = sympy.Float("1e-12", 30)


class TimeLimitExceeded(BaseException):
  """Raised by the alarm of ``time_limit`` (a BaseException, so no
  ``except Exception`` inside sympy or this module swallows it)."""


def _alarm(signum, frame):
  del signum, frame
  raise TimeLimitExceeded()


def _alarm_available() -> bool:
  return (hasattr(signal, "setitimer")
          and threading.current_thread() is threading.main_thread()
          and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0)


@contextlib.contextmanager
def time_limit(seconds: float | None):
  """Raises ``TimeLimitExceeded`` in the block after ``seconds``, if it can.

  The alarm is set only in the main thread, when no interval timer is
  already running; elsewhere the block runs without a limit (see the
  module docstring). Yields whether the alarm is armed.
  """
  if not seconds or not _alarm_available():
    yield False
    return
  previous = signal.signal(signal.SIGALRM, _alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield True
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _clean_text(text: Any) -> str | None:
  """Returns ``text`` as a plain, valid, bounded ``str``, else None."""
  if not isinstance(text, str) or len(text) > MAX_COMPLETION_CHARS:
    return None
  text = str.__str__(text)  # Drop any str subclass behaviour.
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return None
  return text


# ---------------------------------------------------------------- GSM8K --

_NUMBER = re.compile(
    r"(?:(?<![\w)])(?P<sign>[-\u2212])\s?)?\$?\s?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+))?(?P<pct>\s?%)?")
_MAX_DIGITS = 400
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def _to_fraction(match: re.Match[str]) -> fractions.Fraction | None:
  digits = match["num"].replace(",", "")
  if len(digits) > _MAX_DIGITS:
    return None
  value = fractions.Fraction(digits)
  if match["den"] is not None:
    den = int(match["den"])
    if den == 0:
      return None
    value /= den
  return -value if match["sign"] else value


def parse_number(text: str, *, last: bool = False) -> fractions.Fraction | None:
  """Reads the first (or last) number of ``text`` as an exact fraction.

  Args:
    text: Any text, e.g. ``"$1,234.50."`` or ``"-3"``.
    last: Read the last number instead of the first.

  Returns:
    The value, or None if the text holds no number.
  """
  if last:
    match = None
    for match in _NUMBER.finditer(text):
      pass
  else:
    match = _NUMBER.search(text)
  return None if match is None else _to_fraction(match)


def extract_gsm8k(text: str) -> fractions.Fraction | None:
  """The predicted number of a GSM8K completion (rules in the module doc)."""
  index = text.rfind("####")
  if index >= 0:
    value = parse_number(text[index + 4:].split("\n", 1)[0])
    if value is not None:
      return value
  boxed = last_boxed(text)
  if boxed is not None:
    value = parse_number(boxed)
    if value is not None:
      return value
  match = None
  for match in _ANSWER_IS.finditer(text):
    pass
  if match is not None:
    value = parse_number(text[match.end():].split("\n", 1)[0])
    if value is not None:
      return value
  return parse_number(text, last=True)


def _gsm8k_reference(answer: Any) -> fractions.Fraction | None:
  if isinstance(answer, bool):
    return None
  if isinstance(answer, (int, np.integer)):
    return fractions.Fraction(int(answer))
  if isinstance(answer, fractions.Fraction):
    return answer
  answer = _clean_text(answer)
  if answer is None:
    return None
  if "####" in answer:
    answer = answer[answer.rfind("####") + 4:]
  return parse_number(answer)


# ----------------------------------------------------------------- MATH --

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` of ``text``.

  Braces are matched by a scanner that skips escaped ``\\{`` and ``\\}``.
  ``\\boxed 5`` (no braces) gives the token up to the next space or ``$``.

  Returns:
    The content, or None with no box or unbalanced braces.
  """
  match = None
  for match in _BOX_RE.finditer(text):
    pass
  if match is None:
    return None
  i, n = match.end(), len(text)
  while i < n and text[i] == " ":
    i += 1
  if i < n and text[i] != "{":
    j = i
    while j < n and not text[j].isspace() and text[j] != "$":
      j += 1
    return text[i:j] or None
  depth, start = 0, i + 1
  while i < n:
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start:i]
    i += 1
  return None


_TEXT_CMD = re.compile(
    r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit)\s*\{")
_WORDS = re.compile(r"[A-Za-z]+(?:\s+[A-Za-z]+)*")
_UNIT_POWER = re.compile(r"\s*\^\s*(?:\{\s*[23]\s*\}|[23])")
_UNITS = (
    r"square\s+units|sq\.?\s*units|units?|cm|mm|km|inches|inch|feet|foot|"
    r"ft|meters?|metres?|degrees?|cents?|dollars?|hours?|minutes?|seconds?|"
    r"miles?|mph|pounds?|days?|weeks?|years?")
_TRAILING_UNIT = re.compile(
    rf"(?<=[\d}}\s])\s*(?:{_UNITS})(?:\s*\^\s*(?:\{{\s*[23]\s*\}}|[23]))?\s*$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SIMPLE_REPLACEMENTS = (
    (re.compile(r"\\left\.|\\right\."), ""),
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\displaystyle(?![a-zA-Z])"), ""),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])"), ""),
    (re.compile(r"\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|\u00b0"), ""),
    (re.compile(r"\\%|%"), ""),
    (re.compile(r"(\d)(?:,\\!\s*|\{,\})(?=\d{3}(?!\d))"), r"\1"),
)
# Spacing commands, but never the row break ``\\`` (kept as it is).
_SPACING = re.compile(r"\\\\|\\[!,;: ]|\\q?quad(?![a-zA-Z])")


def _replace_text_commands(text: str) -> str:
  """Resolves ``\\text{...}``-like commands (see the module docstring)."""
  for _ in range(64):
    match = _TEXT_CMD.search(text)
    if match is None:
      return text
    depth, i = 1, match.end()
    while i < len(text) and depth:
      if text[i] == "{":
        depth += 1
      elif text[i] == "}":
        depth -= 1
      i += 1
    if depth:
      return text  # Unbalanced: leave it to the parser to reject.
    content = text[match.end():i - 1]
    rest = text[:match.start()] + text[i:]
    if _WORDS.fullmatch(content.strip()) and rest.strip():
      word = content.strip().lower()
      if word in ("and", "or"):
        text = text[:match.start()] + "," + text[i:]
      else:
        unit_power = _UNIT_POWER.match(text, i)
        end = unit_power.end() if unit_power else i
        text = text[:match.start()] + " " + text[end:]
    else:
      text = text[:match.start()] + content + text[i:]
  return text


def normalize(answer: str) -> str:
  """Normalises a MATH answer string (rules in the module docstring)."""
  text = answer.strip().replace("\\$", "").replace("$", "")
  text = _replace_text_commands(text)
  for pattern, replacement in _SIMPLE_REPLACEMENTS:
    text = pattern.sub(replacement, text)
  text = _SPACING.sub(lambda m: m[0] if m[0] == "\\\\" else " ", text)
  # Whitespace is collapsed before the unit pattern: on long runs of spaces
  # its leading `\s*` would otherwise cost quadratic time.
  text = _TRAILING_UNIT.sub("", " ".join(text.split()))
  text = " ".join(text.split()).rstrip(" .")
  if _THOUSANDS.fullmatch(text):
    text = text.replace(",", "")
  return text


def _is_word(text: str) -> bool:
  return _WORDS.fullmatch(text) is not None and len(text) > 1


def _numeric(value: sympy.Expr, subs: dict[Any, Any] | None) -> sympy.Expr:
  result = value.evalf(30, subs=subs) if subs else value.evalf(30)
  if not result.is_number or result.has(sympy.nan, sympy.zoo, sympy.oo,
                                        -sympy.oo):
    raise ValueError("not a finite number")
  return result


def _points(symbols: list[sympy.Symbol]) -> list[dict[Any, Any]]:
  rng = random.Random(0)
  return [{s: sympy.Rational(rng.randint(53, 251), 97) for s in symbols}
          for _ in range(_NUM_POINTS)]


def _close(a: sympy.Expr, b: sympy.Expr, tol: sympy.Float) -> bool:
  return bool(abs(a - b) <= tol * max(sympy.Integer(1), abs(a), abs(b)))


def _expr_equiv(a: sympy.Expr, b: sympy.Expr, *, symbolic: bool) -> bool:
  """Equivalence of two expressions (rules in the module docstring)."""
  if a == b:
    return True
  infinities = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
  if a.has(*infinities) or b.has(*infinities):
    return False
  if a.is_Rational and b.is_Rational:
    return False
  symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
  if not symbols:
    try:
      return _close(_numeric(a, None), _numeric(b, None), _REL_TOL_NUMERIC)
    except (ValueError, TypeError, ArithmeticError):
      return False
  matches = 0
  for point in _points(symbols):
    try:
      if not _close(_numeric(a, point), _numeric(b, point), _REL_TOL_SYMBOLIC):
        matches = -1
        break
      matches += 1
    except (ValueError, TypeError, ArithmeticError):
      continue
  if matches >= 2:
    return True
  if symbolic and matches == 0:  # Numerically undecided: try sympy.
    try:
      return sympy.simplify(a - b) == 0
    except (ValueError, TypeError, ArithmeticError, RecursionError):
      return False
  return False


def _proportional(d1: sympy.Expr, d2: sympy.Expr) -> bool:
  """Whether ``d1 = c * d2`` for a constant ``c != 0`` (numerically)."""
  symbols = sorted(d1.free_symbols | d2.free_symbols, key=lambda s: s.name)
  if not symbols:
    return False
  ratios = []
  for point in _points(symbols):
    try:
      v1, v2 = _numeric(d1, point), _numeric(d2, point)
    except (ValueError, TypeError, ArithmeticError):
      continue
    if abs(v2) < _REL_TOL_SYMBOLIC:
      return False
    ratios.append(v1 / v2)
  return (len(ratios) >= 2 and abs(ratios[0]) > _REL_TOL_SYMBOLIC
          and all(_close(r, ratios[0], _REL_TOL_SYMBOLIC) for r in ratios))


def _multiset_equiv(xs: Sequence[Any], ys: Sequence[Any], symbolic: bool):
  """Whether a perfect matching of equivalent items exists."""
  if len(xs) != len(ys):
    return False
  match_of_y: dict[int, int] = {}
  cache: dict[tuple[int, int], bool] = {}

  def equiv(i, j):
    if (i, j) not in cache:
      cache[i, j] = _equiv(xs[i], ys[j], symbolic)
    return cache[i, j]

  def augment(i, seen):
    for j in range(len(ys)):
      if j not in seen and equiv(i, j):
        seen.add(j)
        if j not in match_of_y or augment(match_of_y[j], seen):
          match_of_y[j] = i
          return True
    return False

  return all(augment(i, set()) for i in range(len(xs)))


def _equiv(a: Any, b: Any, symbolic: bool) -> bool:
  """Equivalence of two parsed answers (rules in the module docstring)."""
  R, B, C, U, M = (latex.Relation, latex.Bracketed, latex.Collection,
                   latex.Union, latex.Matrix)
  if isinstance(a, R) or isinstance(b, R):
    if isinstance(a, R) and isinstance(b, R):
      if a.op != b.op:
        return False
      if isinstance(a.lhs, sympy.Symbol) and a.lhs == b.lhs:
        return _equiv(a.rhs, b.rhs, symbolic)
      if a.op == "=" and all(isinstance(v, sympy.Expr)
                             for v in (a.lhs, a.rhs, b.lhs, b.rhs)):
        return _proportional(a.lhs - a.rhs, b.lhs - b.rhs)
      return False
    rel, other = (a, b) if isinstance(a, R) else (b, a)
    return (isinstance(rel.lhs, sympy.Symbol)
            and _equiv(rel.rhs, other, symbolic))
  if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
    return _expr_equiv(a, b, symbolic=symbolic)
  if isinstance(a, M) and isinstance(b, B):
    a, b = b, a
  if isinstance(a, B) and isinstance(b, M):
    flat = [v for row in b.rows for v in row]
    return (a.left + a.right == "()" and min(len(b.rows), len(b.rows[0])) == 1
            and len(flat) == len(a.items)
            and all(_equiv(x, y, symbolic) for x, y in zip(a.items, flat)))
  if type(a) is not type(b):
    return False
  if isinstance(a, B):
    return (a.left == b.left and a.right == b.right
            and len(a.items) == len(b.items)
            and all(_equiv(x, y, symbolic) for x, y in zip(a.items, b.items)))
  if isinstance(a, C):
    return _multiset_equiv(a.items, b.items, symbolic)
  if isinstance(a, U):
    return _multiset_equiv(a.parts, b.parts, symbolic)
  if isinstance(a, M):
    return (len(a.rows) == len(b.rows) and len(a.rows[0]) == len(b.rows[0])
            and all(_equiv(x, y, symbolic)
                    for ra, rb in zip(a.rows, b.rows) for x, y in zip(ra, rb)))
  return False


def is_equivalent(candidate: str, reference: str, *,
                  time_limit_s: float | None = TIME_LIMIT_S) -> bool:
  """Whether two MATH answers are equivalent (rules in the module doc).

  Args:
    candidate: The predicted answer (a box's content), LaTeX.
    reference: The reference answer, LaTeX.
    time_limit_s: Limit on parsing and comparing, enforced by an alarm
      where possible (see ``time_limit``); None for no limit.

  Returns:
    The verdict; False on any error or when the limit is hit. Never raises.
  """
  try:
    with time_limit(time_limit_s) as armed:
      c, r = normalize(candidate), normalize(reference)
      if not c or not r:
        return False
      if c.replace(" ", "") == r.replace(" ", ""):
        return True
      if _is_word(r):
        return c.lower() == r.lower()
      return _equiv(latex.parse(c), latex.parse(r), armed)
  # pylint: disable-next=broad-except
  except (Exception, TimeLimitExceeded, RecursionError):
    return False


# --------------------------------------------------------------- verify --


def verify(completion: Any, answer: Any, *, style: str) -> float:
  """Scores one completion against a reference final answer.

  Args:
    completion: Decoded model output.
    answer: Reference final answer: for ``"gsm8k"`` a number, a numeric
      string or a solution ending in ``#### n``; for ``"math"`` a LaTeX
      answer (or a solution with a ``\\boxed{}``).
    style: ``"gsm8k"`` or ``"math"``.

  Returns:
    1.0 if correct under the rules of the module docstring, else 0.0.
    Never raises: an unknown style, an unusable answer or any error inside
    scores 0.0.
  """
  try:
    text = _clean_text(completion)
    if text is None:
      return 0.0
    if style == "gsm8k":
      want = _gsm8k_reference(answer)
      if want is None:
        return 0.0
      with time_limit(TIME_LIMIT_S):
        got = extract_gsm8k(text)
      return 1.0 if got is not None and got == want else 0.0
    if style == "math":
      reference = _clean_text(answer)
      if reference is None:
        return 0.0
      if "\\boxed" in reference or "\\fbox" in reference:
        reference = last_boxed(reference)
      boxed = last_boxed(text)
      if boxed is None or reference is None:
        return 0.0
      return 1.0 if is_equivalent(boxed, reference) else 0.0
    return 0.0
  # pylint: disable-next=broad-except
  except (Exception, TimeLimitExceeded, RecursionError):
    return 0.0


def batch_verify(completions: Sequence[Any], answers: Sequence[Any], *,
                 style: str) -> np.ndarray:
  """Scores N completions against N answers in this process.

  Args:
    completions: N decoded completions.
    answers: N references aligned with ``completions``.
    style: ``"gsm8k"`` or ``"math"``.

  Returns:
    reward_N: float32 [N] array of 0.0 / 1.0.

  Raises:
    ValueError: If the lengths differ or ``style`` is unknown (wiring bugs,
      reported rather than scored).
  """
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}.")
  completions, answers = list(completions), list(answers)
  if len(completions) != len(answers):
    raise ValueError(
        f"batch_verify got {len(completions)} completions but {len(answers)} "
        "answers; pass one answer per completion (repeat each prompt's "
        "answer G times for G samples per prompt).")
  return np.array([verify(c, a, style=style)
                   for c, a in zip(completions, answers)],
                  dtype=np.float32).reshape(len(completions))
