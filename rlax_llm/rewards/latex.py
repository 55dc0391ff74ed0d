"""A small, safe parser from LaTeX / infix answer text to sympy objects.

The text a model writes is never executed. Nothing here calls ``eval``,
``exec``, ``sympy.sympify``, ``parse_expr`` or ``parse_latex``: a tokenizer
and a recursive-descent parser build sympy objects through their
constructors (``Integer``, ``Rational``, ``Symbol``, ``Add``, ``Mul``,
``Pow``, ``sqrt``, ``pi`` and a whitelist of functions), and reject
everything else with ``ParseError``.

Grammar (lowest precedence first)::

  answer    := item (',' item)*             top level: several answers
  item      := union (('=' | '\\in') union)?
  union     := additive ('\\cup' additive)*
  additive  := [sign] term (('+' | '-' | '\\pm' | '\\mp') term)*
  term      := factor (('*' | '\\cdot' | '\\times' | '/' | '\\div') factor
                       | factor)*           juxtaposition multiplies
  factor    := ('-' | '+') factor | power
  power     := primary ['^' exponent]       right-associative
  primary   := number | letter [subscript] | greek | '\\pi' | '\\infty'
             | '(' answer ')' | '[' answer ']' | '{' answer '}'
             | '\\{' answer '\\}' | '\\frac' arg arg | '\\sqrt' ['[' n ']'] arg
             | function [power] arg | '\\begin{pmatrix}' rows '\\end{pmatrix}'

Conventions:
  * Numbers are exact: ``0.15`` is ``Rational(3, 20)``.
  * Letters are symbols and juxtaposition multiplies (``2xy`` is
    ``2*x*y``); ``i`` is the imaginary unit; ``\\alpha`` ... ``\\omega`` are
    symbols; ``x_1`` / ``x_{ab}`` are single symbols. A number with a
    subscript (``204_5``, a numeral in base 5) is an opaque atom equal only
    to the same numeral with the same base.
  * ``\\frac12`` and ``\\frac 34`` take one-character arguments, as LaTeX
    does. An integer directly followed by a ``\\frac`` of two integers is a
    mixed number: ``1\\frac{4}{5}`` is ``9/5``.
  * ``^`` reads a brace group or one whole token (``2^10`` is ``1024``,
    ``10^10^10`` is ``10^(10^10)``).
  * ``(a, b)``, ``[a, b)`` ... with two or more items are ``Bracketed``
    (tuples, intervals: the brackets are kept); one item in brackets is a
    group. ``\\{a, b\\}`` and a top-level comma list are an unordered
    ``Collection``. ``a \\pm b`` expands to the collection ``{a+b, a-b}``.
  * ``x = 5`` and ``x \\in [0, 1]`` are ``Relation`` objects.

Hard caps (``ParseError`` beyond them, so hostile input costs little):
  ``MAX_CHARS`` characters of input, ``MAX_DEPTH`` nested constructs,
  exponents of magnitude above ``MAX_EXPONENT`` (numerator and denominator),
  exact numeric powers above ``MAX_POWER_BITS`` bits (``10^10^10^10`` fails
  at once), and ``MAX_ITEMS`` items in any list.
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Any

import sympy

__all__ = [
    "Bracketed",
    "Collection",
    "MAX_CHARS",
    "MAX_DEPTH",
    "MAX_EXPONENT",
    "MAX_ITEMS",
    "MAX_POWER_BITS",
    "Matrix",
    "ParseError",
    "Relation",
    "Union",
    "parse",
    "tokenize",
]

MAX_CHARS = 2000
MAX_DEPTH = 60
MAX_EXPONENT = 1000
MAX_POWER_BITS = 20_000
MAX_ITEMS = 64


class ParseError(ValueError):
  """The text is not an answer this parser accepts (or exceeds a cap)."""


@dataclasses.dataclass(frozen=True)
class Bracketed:
  """An ordered list in brackets: a tuple ``(a, b)`` or interval ``[a, b)``."""
  left: str
  items: tuple[Any, ...]
  right: str


@dataclasses.dataclass(frozen=True)
class Collection:
  """An unordered list of answers: ``\\{a, b\\}``, ``a, b``, ``a \\pm b``."""
  items: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Union:
  """A union of sets, ``A \\cup B``; the order of the parts is irrelevant."""
  parts: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Matrix:
  """A matrix or vector from a ``pmatrix``/``bmatrix`` environment."""
  rows: tuple[tuple[Any, ...], ...]


@dataclasses.dataclass(frozen=True)
class Relation:
  """``lhs = rhs`` (op ``"="``) or ``lhs \\in rhs`` (op ``"in"``)."""
  op: str
  lhs: Any
  rhs: Any


# Sentinel for ``\pm``: ``a \pm b`` is built as ``a + PM*b`` and expanded.
# Its name cannot be produced from text (symbol names are letters).
PM = sympy.Symbol("\u00b1")

_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota "
    "kappa lambda mu nu xi rho sigma tau upsilon phi varphi chi psi omega "
    "Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split())
_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot,
    "sec": sympy.sec, "csc": sympy.csc, "arcsin": sympy.asin,
    "arccos": sympy.acos, "arctan": sympy.atan, "ln": sympy.log,
    "log": sympy.log, "exp": sympy.exp,
}
_MATRIX_ENVS = frozenset(["pmatrix", "bmatrix", "matrix", "vmatrix"])
_UNICODE = {
    "\u2212": ("op", "-"), "\u00b7": ("cmd", "cdot"),
    "\u00d7": ("cmd", "times"), "\u00f7": ("cmd", "div"),
    "\u03c0": ("cmd", "pi"), "\u221e": ("cmd", "infty"),
    "\u221a": ("cmd", "sqrt"), "\u00b1": ("cmd", "pm"),
    "\u222a": ("cmd", "cup"), "\u2208": ("cmd", "in"),
}
_OPS = frozenset("+-*/^_()[]{},=&|!")
_IGNORED_CMDS = frozenset(["left", "right", "displaystyle", "big", "Big",
                           "bigl", "bigr", "Bigl", "Bigr", "limits"])


def tokenize(text: str) -> list[tuple[str, str]]:
  """Splits answer text into ``(kind, text)`` tokens.

  Kinds: ``num`` (``12``, ``0.5``, ``.5``), ``letter`` (one Latin letter),
  ``cmd`` (``\\name`` without the backslash, or ``{``/``}`` for ``\\{``
  ``\\}``), ``newrow`` (``\\\\``), ``op`` (one of ``+-*/^_()[]{},=&|!``).
  Spacing commands (``\\,`` ``\\!`` ``\\;`` ``\\:`` ``\\ ``, ``\\quad``) and
  sizing commands (``\\left``, ``\\right``, ...) are dropped.

  Raises:
    ParseError: On a character outside this alphabet or text over
      ``MAX_CHARS``.
  """
  if len(text) > MAX_CHARS:
    raise ParseError(f"answer longer than {MAX_CHARS} characters")
  tokens = []
  i, n = 0, len(text)
  while i < n:
    c = text[i]
    if c.isspace() or c == "~":
      i += 1
    elif "0" <= c <= "9" or (
        c == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
      j = i
      while j < n and "0" <= text[j] <= "9":
        j += 1
      if j + 1 < n and text[j] == "." and "0" <= text[j + 1] <= "9":
        j += 1
        while j < n and "0" <= text[j] <= "9":
          j += 1
      tokens.append(("num", text[i:j]))
      i = j
    elif ("a" <= c <= "z") or ("A" <= c <= "Z"):
      tokens.append(("letter", c))
      i += 1
    elif c == "\\":
      j = i + 1
      while j < n and (("a" <= text[j] <= "z") or ("A" <= text[j] <= "Z")):
        j += 1
      if j > i + 1:
        name = text[i + 1:j]
        if name not in _IGNORED_CMDS and name not in ("quad", "qquad"):
          tokens.append(("cmd", name))
        i = j
      elif j < n and text[j] == "\\":
        tokens.append(("newrow", "\\\\"))
        i = j + 1
      elif j < n and text[j] in "{}":
        tokens.append(("cmd", text[j]))
        i = j + 1
      elif j < n and text[j] in ",!;: ":
        i = j + 1
      else:
        raise ParseError(f"unsupported escape at position {i}")
    elif c in _OPS:
      tokens.append(("op", c))
      i += 1
    elif c in _UNICODE:
      tokens.append(_UNICODE[c])
      i += 1
    else:
      raise ParseError(f"unsupported character {c!r}")
  return tokens


def _rational(token: str) -> sympy.Rational:
  value = fractions.Fraction(token)
  return sympy.Rational(value.numerator, value.denominator)


def _bits(q: sympy.Rational) -> int:
  return int(q.p).bit_length() + int(q.q).bit_length()


def power(base: Any, exponent: Any) -> sympy.Expr:
  """``base ** exponent`` with the exponent and result-size caps."""
  base = _expr(base)
  exponent = _expr(exponent)
  if exponent.is_Rational:
    if abs(exponent.p) > MAX_EXPONENT or exponent.q > MAX_EXPONENT:
      raise ParseError(f"exponent {exponent} exceeds {MAX_EXPONENT}")
    if base.is_Rational and abs(exponent.p) * _bits(base) > MAX_POWER_BITS:
      raise ParseError(f"power exceeds {MAX_POWER_BITS} bits")
  elif exponent.is_number and exponent.is_real is not False:
    # An irrational numeric exponent: bound its magnitude cheaply.
    try:
      if abs(float(exponent)) > MAX_EXPONENT:
        raise ParseError(f"exponent exceeds {MAX_EXPONENT}")
    except (TypeError, OverflowError) as e:
      raise ParseError("exponent not evaluable") from e
  return sympy.Pow(base, exponent)


def _expr(value: Any) -> sympy.Expr:
  if not isinstance(value, sympy.Expr):
    raise ParseError(f"expected an expression, got {type(value).__name__}")
  return value


class _Parser:
  """Recursive-descent parser over a token list (see the module grammar)."""

  def __init__(self, tokens: list[tuple[str, str]]):
    self.tokens = tokens
    self.pos = 0
    self.depth = 0

  # -- token helpers --
  def peek(self, offset: int = 0) -> tuple[str, str]:
    i = self.pos + offset
    return self.tokens[i] if i < len(self.tokens) else ("end", "")

  def take(self) -> tuple[str, str]:
    tok = self.peek()
    self.pos += 1
    return tok

  def at(self, kind: str, text: str | None = None) -> bool:
    k, t = self.peek()
    return k == kind and (text is None or t == text)

  def expect(self, kind: str, text: str) -> None:
    if not self.at(kind, text):
      raise ParseError(f"expected {text!r}, got {self.peek()[1]!r}")
    self.pos += 1

  def enter(self) -> None:
    self.depth += 1
    if self.depth > MAX_DEPTH:
      raise ParseError(f"nesting deeper than {MAX_DEPTH}")

  # -- grammar --
  def answer_list(self, closers: tuple[tuple[str, str], ...]) -> list[Any]:
    items = [self.item()]
    while self.at("op", ","):
      self.pos += 1
      items.append(self.item())
      if len(items) > MAX_ITEMS:
        raise ParseError(f"more than {MAX_ITEMS} items")
    if self.peek() not in closers:
      raise ParseError(f"unexpected {self.peek()[1]!r}")
    return items

  def item(self) -> Any:
    lhs = self.union()
    if self.at("op", "="):
      self.pos += 1
      return Relation("=", lhs, self.union())
    if self.at("cmd", "in"):
      self.pos += 1
      return Relation("in", lhs, self.union())
    return lhs

  def union(self) -> Any:
    parts = [self.additive()]
    while self.at("cmd", "cup"):
      self.pos += 1
      parts.append(self.additive())
      if len(parts) > MAX_ITEMS:
        raise ParseError(f"more than {MAX_ITEMS} items")
    return parts[0] if len(parts) == 1 else Union(tuple(parts))

  def additive(self) -> Any:
    self.enter()
    value = self.term()
    while True:
      k, t = self.peek()
      if (k, t) == ("op", "+"):
        sign = 1
      elif (k, t) == ("op", "-"):
        sign = -1
      elif (k, t) in (("cmd", "pm"), ("cmd", "mp")):
        sign = PM if t == "pm" else -PM
      else:
        break
      self.pos += 1
      value = sympy.Add(_expr(value), sympy.Mul(sign, _expr(self.term())))
    self.depth -= 1
    return value

  def term(self) -> Any:
    self.enter()
    start = self.pos
    value = self.factor()
    # A lone integer literal may start a mixed number.
    first_is_int = (self.pos == start + 1 and self.tokens[start][0] == "num"
                    and "." not in self.tokens[start][1])
    while True:
      k, t = self.peek()
      if (k, t) in (("op", "*"), ("cmd", "cdot"), ("cmd", "times")):
        self.pos += 1
        value = sympy.Mul(_expr(value), _expr(self.factor()))
      elif (k, t) in (("op", "/"), ("cmd", "div")):
        self.pos += 1
        value = sympy.Mul(_expr(value), power(self.factor(), sympy.Integer(-1)))
      elif self.starts_primary():
        if first_is_int and (k, t) == ("cmd", "frac"):
          frac, literal = self.frac()
          # Mixed number: 1\frac{4}{5} is 1 + 4/5.
          value = (sympy.Add(_expr(value), frac) if literal
                   else sympy.Mul(_expr(value), frac))
        else:
          value = sympy.Mul(_expr(value), _expr(self.power()))
      else:
        break
      first_is_int = False
    self.depth -= 1
    return value

  def starts_primary(self) -> bool:
    k, t = self.peek()
    if k in ("num", "letter"):
      return True
    if k == "op":
      return t in "({"
    if k == "cmd":
      return (t in ("pi", "infty", "frac", "sqrt", "begin", "{")
              or t in _GREEK or t in _FUNCTIONS)
    return False

  def factor(self) -> Any:
    if self.at("op", "-"):
      self.pos += 1
      self.enter()
      value = sympy.Mul(sympy.Integer(-1), _expr(self.factor()))
      self.depth -= 1
      return value
    if self.at("op", "+"):
      self.pos += 1
      return self.factor()
    return self.power()

  def power(self) -> Any:
    self.enter()
    base = self.primary()
    if self.at("op", "^"):
      self.pos += 1
      base = power(base, self.exponent())
    self.depth -= 1
    return base

  def exponent(self) -> Any:
    if self.at("op", "-"):
      self.pos += 1
      self.enter()
      value = sympy.Mul(sympy.Integer(-1), _expr(self.exponent()))
      self.depth -= 1
      return value
    if self.at("op", "{"):
      return self.group()
    return self.power()  # one token, and its own exponent (right-assoc).

  def group(self) -> Any:
    """A brace group ``{...}``: one item, or a Collection of several."""
    self.enter()
    self.expect("op", "{")
    items = self.answer_list((("op", "}"),))
    self.pos += 1
    self.depth -= 1
    if len(items) == 1:
      return items[0]
    return Collection(tuple(items))

  def argument(self) -> Any:
    """A macro argument: a brace group or a single character/command."""
    k, t = self.peek()
    if (k, t) == ("op", "{"):
      return self.group()
    if k == "num":
      self.pos += 1
      if len(t) > 1:  # \frac12: the argument is one character.
        self.tokens[self.pos - 1:self.pos] = [("num", t[0]), ("num", t[1:])]
      return _rational(t[0]) if t[0] != "." else _fail("bad argument")
    if k == "letter" or (k == "cmd" and (t in _GREEK or t in ("pi", "infty"))):
      return self.primary()
    raise ParseError(f"expected an argument, got {t!r}")

  def frac(self) -> tuple[sympy.Expr, bool]:
    self.expect("cmd", "frac")
    start = self.pos
    num = _expr(self.argument())
    den = _expr(self.argument())
    literal = all(k == "num" for k, _ in self.tokens[start:self.pos]
                  if k != "op") and num.is_Integer and den.is_Integer
    if den == 0:
      raise ParseError("division by zero")
    return sympy.Mul(num, power(den, sympy.Integer(-1))), literal

  def primary(self) -> Any:
    self.enter()
    value = self._primary()
    self.depth -= 1
    return value

  def _primary(self) -> Any:
    k, t = self.peek()
    if k == "num":
      self.pos += 1
      if self.at("op", "_"):  # A numeral with a base: 204_5.
        self.pos += 1
        return sympy.Symbol(f"{t}_{self.subscript()}")
      return _rational(t)
    if k == "letter":
      self.pos += 1
      if self.at("op", "_"):
        self.pos += 1
        return sympy.Symbol(f"{t}_{self.subscript()}")
      return sympy.I if t == "i" else sympy.Symbol(t)
    if k == "op" and t == "(":
      return self.bracketed()
    if k == "op" and t == "[":
      return self.bracketed()
    if k == "op" and t == "{":
      return self.group()
    if k != "cmd":
      raise ParseError(f"unexpected {t!r}")
    if t == "{":
      self.enter()
      self.pos += 1
      items = self.answer_list((("cmd", "}"),))
      self.pos += 1
      self.depth -= 1
      return Collection(tuple(items))
    if t == "pi":
      self.pos += 1
      return sympy.pi
    if t == "infty":
      self.pos += 1
      return sympy.oo
    if t in _GREEK:
      self.pos += 1
      name = t[3:] if t.startswith("var") else t
      if self.at("op", "_"):
        self.pos += 1
        name = f"{name}_{self.subscript()}"
      return sympy.Symbol(name)
    if t == "frac":
      return self.frac()[0]
    if t == "sqrt":
      self.pos += 1
      index = sympy.Integer(2)
      if self.at("op", "["):
        self.pos += 1
        index = _expr(self.additive())
        self.expect("op", "]")
      return power(self.argument(), power(index, sympy.Integer(-1)))
    if t in _FUNCTIONS:
      return self.function()
    if t == "begin":
      return self.matrix()
    raise ParseError(f"unsupported command \\{t}")

  def subscript(self) -> str:
    if self.at("op", "{"):
      self.pos += 1
      parts = []
      while self.peek()[0] in ("num", "letter"):
        parts.append(self.take()[1])
      self.expect("op", "}")
    else:
      parts = [self.take()[1]] if self.peek()[0] in ("num", "letter") else []
    if not parts:
      raise ParseError("empty subscript")
    return "".join(parts)

  def bracketed(self) -> Any:
    self.enter()
    left = self.take()[1]
    items = self.answer_list((("op", ")"), ("op", "]")))
    right = self.take()[1]
    self.depth -= 1
    if len(items) == 1 and (left + right) in ("()", "[]"):
      return items[0]
    return Bracketed(left, tuple(items), right)

  def function(self) -> sympy.Expr:
    name = self.take()[1]
    fn = _FUNCTIONS[name]
    base = None
    if name == "log" and self.at("op", "_"):
      self.pos += 1
      base = _expr(self.argument())
    exponent = None
    if self.at("op", "^"):  # \sin^2 x
      self.pos += 1
      exponent = self.exponent()
    if self.at("op", "("):
      arg = _expr(self.bracketed())
    else:
      arg = _expr(self.power())
    value = fn(arg) if base is None else sympy.log(arg, base)
    return value if exponent is None else power(value, exponent)

  def matrix(self) -> Matrix:
    self.expect("cmd", "begin")
    env = self._env_name()
    if env not in _MATRIX_ENVS:
      raise ParseError(f"unsupported environment {env!r}")
    rows, row = [], [_expr(self.additive())]
    while True:
      if self.at("op", "&"):
        self.pos += 1
        row.append(_expr(self.additive()))
      elif self.at("newrow"):
        self.pos += 1
        rows.append(tuple(row))
        if self.at("cmd", "end"):
          row = []
          break
        row = [_expr(self.additive())]
      else:
        break
      if len(row) > MAX_ITEMS or len(rows) > MAX_ITEMS:
        raise ParseError(f"matrix larger than {MAX_ITEMS}")
    if row:
      rows.append(tuple(row))
    self.expect("cmd", "end")
    if self._env_name() != env:
      raise ParseError(f"unbalanced environment {env!r}")
    if len({len(r) for r in rows}) != 1:
      raise ParseError("ragged matrix")
    return Matrix(tuple(rows))

  def _env_name(self) -> str:
    self.expect("op", "{")
    name = []
    while self.at("letter"):
      name.append(self.take()[1])
    self.expect("op", "}")
    return "".join(name)


def _fail(message: str):
  raise ParseError(message)


def _expand_pm(value: Any) -> list[Any]:
  """Expands ``a + PM*b`` into ``[a + b, a - b]``; rejects PM elsewhere."""
  if isinstance(value, sympy.Expr) and value.has(PM):
    plus, minus = value.xreplace({PM: 1}), value.xreplace({PM: -1})
    if plus.has(PM) or minus.has(PM):
      raise ParseError("misplaced \\pm")
    return [plus, minus]
  if _contains_pm(value):
    raise ParseError("\\pm is only supported in a list of answers")
  return [value]


def _contains_pm(value: Any) -> bool:
  if isinstance(value, sympy.Basic):
    return value.has(PM)
  if isinstance(value, (Bracketed, Collection)):
    return any(_contains_pm(v) for v in value.items)
  if isinstance(value, Union):
    return any(_contains_pm(v) for v in value.parts)
  if isinstance(value, Matrix):
    return any(_contains_pm(v) for r in value.rows for v in r)
  if isinstance(value, Relation):
    return _contains_pm(value.lhs) or _contains_pm(value.rhs)
  return False


def parse(text: str) -> Any:
  """Parses normalised answer text into a sympy expression or a container.

  Args:
    text: Answer text without ``$`` delimiters, ``\\text{}`` or units (see
      ``rlax_llm.rewards.math.normalize``).

  Returns:
    A ``sympy.Expr``, or a ``Bracketed`` / ``Collection`` / ``Union`` /
    ``Matrix`` / ``Relation``. A top-level comma list or a ``\\pm`` gives a
    ``Collection`` (one of a single item is unwrapped).

  Raises:
    ParseError: On anything outside the grammar or beyond a cap.
  """
  parser = _Parser(tokenize(text))
  if not parser.tokens:
    raise ParseError("empty answer")
  items = parser.answer_list((("end", ""),))
  flat = []
  for item in items:
    if isinstance(item, Collection):
      for sub in item.items:
        flat.extend(_expand_pm(sub))
    else:
      flat.extend(_expand_pm(item))
  for value in flat:
    if isinstance(value, sympy.Expr) and value.has(sympy.zoo, sympy.nan):
      raise ParseError("undefined value (division by zero)")
  return flat[0] if len(flat) == 1 else Collection(tuple(flat))
