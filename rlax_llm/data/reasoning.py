"""A synthetic reasoning corpus whose solutions are written chains of thought.

Three task families, each a prompt and a completion that ends in
``answer X`` (scored by `rlax_llm.rewards.reasoning.verify`):

  chain   left-to-right sums of 2-6 two-digit operands, one written step per
          operation::

            calc 12+7-5+30:  ->  12+7=19, 19-5=14, 14+30=44. answer 44

          The number of operands sets the length; training on few operands
          and testing on more is an out-of-distribution split (`ood`).
  search  Countdown over three numbers, solved by a written search: the
          first-level combinations are tried in a random order, each with
          the second step that comes closest to the target, until one hits::

            reach 24 with 5 8 8:  ->  8+8=16, 16+5=21 no. 8-5=3, 3*8=24
            yes. answer (8-5)*8

          How many tries a problem needs is random (often one or two,
          sometimes ten), so lengths are long-tailed by construction.
  sort    a list of 3-8 digits in ascending order, answered at once (a
          different skill, held out from fine-tuning to measure forgetting)::

            sort 5 3 9 1:  ->  answer 1 3 5 9

Problems are drawn from a seeded generator (`train_batch(step, B)` is a pure
function of seed, step and draw). Whether a problem belongs to the test split
is decided by a hash of its prompt salted with `split_salt`, independent of
the seed, so a model pretrained with one seed and fine-tuned with another
never trains on the other's test problems. Every character is in
`ALPHABET` (the character tokenizer's default alphabet plus "/").
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple, Sequence

import numpy as np

from rlax_llm.data.tokenizer import DEFAULT_ALPHABET

__all__ = ["ALPHABET", "FAMILIES", "ReasoningConfig", "ReasoningExample",
           "ReasoningTask", "chain_problem", "parse_mix", "search_problem",
           "sort_problem"]

ALPHABET = DEFAULT_ALPHABET + "/"
FAMILIES = ("chain", "search", "sort")


class ReasoningExample(NamedTuple):
  """One problem: `prompt`, the reference `answer` the verifier reads, the
  SFT `target` (chain of thought + answer, without EOS), its `family`."""
  prompt: str
  answer: str
  target: str
  family: str
  index: int = -1


# -- families -------------------------------------------------------------------
def chain_problem(rng: np.random.Generator, num_operands: int,
                  max_operand: int = 99) -> ReasoningExample:
  """A left-to-right sum of `num_operands` operands in [1, max_operand]."""
  vals = [int(v) for v in rng.integers(1, max_operand + 1, num_operands)]
  ops = [("+", "-")[int(b)] for b in rng.integers(0, 2, num_operands - 1)]
  expr = str(vals[0]) + "".join(o + str(v) for o, v in zip(ops, vals[1:]))
  acc, steps = vals[0], []
  for o, v in zip(ops, vals[1:]):
    new = acc + v if o == "+" else acc - v
    steps.append(f"{acc}{o}{v}={new}")
    acc = new
  return ReasoningExample(f"calc {expr}:", f"chain|{acc}",
                          " " + ", ".join(steps) + f". answer {acc}",
                          "chain")


def _combos(a: int, b: int):
  """(text, value) of a op b for the ops that give a positive integer."""
  hi, lo = max(a, b), min(a, b)
  out = [(f"{a}+{b}", a + b), (f"{a}*{b}", a * b)]
  if hi > lo:
    out.append((f"{hi}-{lo}", hi - lo))
  if lo > 1 and hi % lo == 0:
    out.append((f"{hi}/{lo}", hi // lo))
  return out


def _second(r: int, c: int):
  """(text, value, expression builder) of r op c (both orders for - and /)."""
  out = [("+", r + c, False), ("*", r * c, False)]
  if r > c:
    out.append(("-", r - c, False))
  elif c > r:
    out.append(("-", c - r, True))
  if c > 1 and r % c == 0:
    out.append(("/", r // c, False))
  elif r > 1 and c % r == 0 and c != r:
    out.append(("/", c // r, True))
  return out


def search_problem(rng: np.random.Generator, max_number: int = 13,
                   max_target: int = 150,
                   max_tries: int = 12) -> ReasoningExample | None:
  """A three-number Countdown problem with its written search, or None.

  The target is the value of a random expression over all three numbers;
  the search tries every (pair, operation) in a random order and, for each,
  writes the second step closest to the target (ties: the first in the
  order +, *, -, /). It returns None when the target is outside
  [1, max_target] or the search needs more than `max_tries` tries (the
  caller draws again).
  """
  nums = [int(v) for v in rng.integers(1, max_number + 1, 3)]
  # the target: a random first combination, then a random second step
  i, j = [int(v) for v in rng.choice(3, 2, replace=False)]
  k = 3 - i - j
  first = _combos(nums[i], nums[j])
  _, r = first[int(rng.integers(len(first)))]
  second = _second(r, nums[k])
  _, target, _ = second[int(rng.integers(len(second)))]
  if not 1 <= target <= max_target:
    return None
  tries = []
  for a, b in ((0, 1), (0, 2), (1, 2)):
    c = 3 - a - b
    for text, value in _combos(nums[a], nums[b]):
      tries.append((text, value, nums[c]))
  order = rng.permutation(len(tries))
  lines, answer = [], None
  for n, t in enumerate(order):
    if n >= max_tries:
      return None
    text, r, c = tries[int(t)]
    op, s, flipped = min(_second(r, c), key=lambda x: abs(x[1] - target))
    step = f"{c}{op}{r}" if flipped else f"{r}{op}{c}"
    hit = s == target
    lines.append(f"{text}={r}, {step}={s} {'yes' if hit else 'no'}.")
    if hit:
      answer = f"{c}{op}({text})" if flipped else f"({text}){op}{c}"
      break
  body = " ".join(lines)
  nums_text = " ".join(str(v) for v in nums)
  return ReasoningExample(f"reach {target} with {nums_text}:",
                          f"search|{nums_text}|{target}",
                          f" {body} answer {answer}", "search")


def sort_problem(rng: np.random.Generator, min_len: int = 3,
                 max_len: int = 8) -> ReasoningExample:
  """Sort a list of min_len..max_len digits."""
  n = int(rng.integers(min_len, max_len + 1))
  digits = [int(v) for v in rng.integers(0, 10, n)]
  out = " ".join(str(v) for v in sorted(digits))
  return ReasoningExample("sort " + " ".join(str(v) for v in digits) + ":",
                          f"sort|{out}", f" answer {out}", "sort")


# -- the task -------------------------------------------------------------------
def parse_mix(text: str) -> dict[str, float]:
  """"chain=2,search=2,sort=1" -> normalised weights (a bare name weighs 1)."""
  out = {}
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    name, _, w = part.partition("=")
    name = name.strip()
    if name not in FAMILIES:
      raise ValueError(f"Unknown reasoning family {name!r} in task.families="
                       f"{text!r}; choose from {FAMILIES}.")
    try:
      weight = float(w) if w else 1.0
    except ValueError:
      raise ValueError(f"task.families={text!r}: weight {w!r} of {name!r} is "
                       "not a number (write e.g. 'chain=2,sort=1').") from None
    if weight < 0:
      raise ValueError(f"task.families={text!r}: weight of {name!r} < 0.")
    out[name] = weight
  total = sum(out.values())
  if not out or total <= 0:
    raise ValueError(f"task.families={text!r} names no family with a "
                     f"positive weight; choose from {FAMILIES}.")
  return {k: v / total for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class ReasoningConfig:
  """The generator's settings (`config.task` fields of the same names)."""
  families: str = "chain=1,search=1,sort=1"
  chain_min_operands: int = 2
  chain_max_operands: int = 4
  ood_min_operands: int = 5
  ood_max_operands: int = 6
  chain_max_operand: int = 99
  search_max_number: int = 13
  search_max_target: int = 150
  search_max_tries: int = 12
  sort_min_len: int = 3
  sort_max_len: int = 8
  test_fraction: float = 0.05
  split_salt: int = 0
  batch_by_family: bool = False

  def __post_init__(self):
    parse_mix(self.families)
    for lo, hi, what in (
        (self.chain_min_operands, self.chain_max_operands, "chain"),
        (self.ood_min_operands, self.ood_max_operands, "ood"),
        (self.sort_min_len, self.sort_max_len, "sort")):
      if not 2 <= lo <= hi:
        raise ValueError(f"task.{what}_min/max: need 2 <= min <= max, got "
                         f"{lo}, {hi}.")
    if not 0.0 < self.test_fraction < 0.5:
      raise ValueError(f"task.test_fraction={self.test_fraction}: use a "
                       "share in (0, 0.5).")


class ReasoningTask:
  """Seeded train stream and fixed test splits of the reasoning corpus.

  Splits (`eval_set`): "test" (the configured mix), one per family name
  ("chain", "search", "sort"; each with its configured settings) and "ood"
  (chain with `ood_min_operands`..`ood_max_operands` operands).
  """

  SPLITS = ("test", "ood") + FAMILIES

  def __init__(self, config: ReasoningConfig, seed: int):
    self.config = config
    self.seed = int(seed)
    self.mix = parse_mix(config.families)
    self._names = tuple(self.mix)
    self._probs = np.asarray([self.mix[n] for n in self._names])

  # -- membership --
  def is_test(self, prompt: str) -> bool:
    h = zlib.crc32(f"{self.config.split_salt}|{prompt}".encode())
    return (h % 100_000) < self.config.test_fraction * 100_000

  def _draw(self, rng, family: str, ood: bool = False) -> ReasoningExample:
    c = self.config
    while True:
      if family == "chain":
        lo, hi = ((c.ood_min_operands, c.ood_max_operands) if ood else
                  (c.chain_min_operands, c.chain_max_operands))
        ex = chain_problem(rng, int(rng.integers(lo, hi + 1)),
                           c.chain_max_operand)
      elif family == "search":
        ex = search_problem(rng, c.search_max_number, c.search_max_target,
                            c.search_max_tries)
      else:
        ex = sort_problem(rng, c.sort_min_len, c.sort_max_len)
      if ex is not None:
        return ex

  def train_batch(self, step: int, batch_size: int, *,
                  draw: int = 0) -> list[ReasoningExample]:
    """B train problems for (step, draw): a pure function of the seed."""
    rng = np.random.default_rng([self.seed, int(step), int(draw), 7])
    if self.config.batch_by_family:
      fams = [self._names[int(rng.choice(len(self._names), p=self._probs))]
              ] * batch_size
    else:
      fams = [self._names[int(i)] for i in
              rng.choice(len(self._names), batch_size, p=self._probs)]
    out = []
    for fam in fams:
      while True:
        ex = self._draw(rng, fam)
        if not self.is_test(ex.prompt):
          out.append(ex)
          break
    return out

  def test_set(self, n: int) -> list[ReasoningExample]:
    return self.eval_set("test", n)

  def eval_set(self, split: str, n: int) -> list[ReasoningExample]:
    """The first n distinct test problems of `split` (fixed by split_salt).

    "ood" problems never occur in training (more operands than it uses), so
    they are not filtered by the hash.
    """
    if split not in self.SPLITS:
      raise ValueError(f"The reasoning task has no split {split!r} "
                       f"(config.eval.split); choose one of "
                       f"{list(self.SPLITS)}.")
    rng = np.random.default_rng([self.config.split_salt,
                                 self.SPLITS.index(split), 11])
    out, seen = [], set()
    tries = 0
    while len(out) < n:
      tries += 1
      if tries > 200 * n + 10_000:
        raise ValueError(f"Split {split!r} has fewer than {n} distinct "
                         f"problems ({len(out)} found); ask for fewer "
                         "(config.eval.num_problems) or widen the task.")
      if split == "test":
        fam = self._names[int(rng.choice(len(self._names), p=self._probs))]
      else:
        fam = "chain" if split == "ood" else split
      ex = self._draw(rng, fam, ood=split == "ood")
      if ex.prompt in seen or (split != "ood" and not self.is_test(ex.prompt)):
        continue
      seen.add(ex.prompt)
      out.append(ex._replace(index=len(out)))
    return out

  def length_histogram(self, tokenizer, n: int = 4096, *,
                       bins: Sequence[int] = (0, 10, 20, 30, 50, 75, 100, 150,
                                              200, 300)) -> dict:
    """Completion lengths in tokens (EOS included) of n train problems, per
    family: counts per bin [bins[i], bins[i+1]), mean, median, p95, max."""
    mixed = ReasoningTask(dataclasses.replace(self.config,
                                              batch_by_family=False),
                          self.seed)
    ex = mixed.train_batch(0, n, draw=1_000_003)
    per = {}
    for fam in self._names + ("all",):
      lens = np.asarray([len(tokenizer.encode(e.target)) + 1 for e in ex
                         if fam in ("all", e.family)])
      if lens.size == 0:
        continue
      edges = list(bins) + [max(int(lens.max()) + 1, bins[-1] + 1)]
      counts, _ = np.histogram(lens, bins=edges)
      per[fam] = dict(
          n=int(lens.size), mean=float(lens.mean()),
          median=float(np.median(lens)),
          p95=float(np.percentile(lens, 95)), max=int(lens.max()),
          bins=[f"{edges[i]}-{edges[i + 1] - 1}" for i in range(len(counts))],
          counts=[int(v) for v in counts])
    return per
