"""Tests for rlax_llm.data.arithmetic and rlax_llm.rewards.arithmetic."""

import re
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
import numpy as np
import pytest

from rlax_llm.data.arithmetic import ArithmeticConfig
from rlax_llm.data.arithmetic import ArithmeticTask
from rlax_llm.data.arithmetic import max_answer_length
from rlax_llm.data.arithmetic import max_prompt_length
from rlax_llm.data.arithmetic import Problem
from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.rewards.arithmetic import batch_verify
from rlax_llm.rewards.arithmetic import verify

_PROMPT = re.compile(r"(0|[1-9][0-9]*)([+\-*])(0|[1-9][0-9]*)=")
_DEFAULT = ArithmeticTask()  # 1-2 digits, + - *, seed 0: 30,000 problems.
_LARGE = ArithmeticTask(min_digits=1, max_digits=6, seed=5)


def _eval_answer(prompt):
  """Independent reference: Python's own arithmetic on the prompt text."""
  assert _PROMPT.fullmatch(prompt), prompt
  return str(eval(prompt[:-1]))  # pylint: disable=eval-used


# ------------------------------------------------------------ generation --


@pytest.mark.parametrize("task", [_DEFAULT, _LARGE], ids=["enum", "large"])
def test_answers_match_python_eval(task):
  problems = task.test_set(300)
  for step in range(20):
    problems += task.train_batch(step, 32)
  assert len(problems) == 300 + 20 * 32
  for problem in problems:
    assert isinstance(problem, Problem)
    assert problem.answer == _eval_answer(problem.prompt)


def test_hand_case_format():
  task = ArithmeticTask(max_digits=2, ops=("-",))
  negatives = [p for p in task.test_set(200) if p.answer.startswith("-")]
  assert negatives, "'-' problems must produce negative answers too"
  for p in negatives:
    a, b = p.prompt[:-1].split("-")
    assert int(a) < int(b) and p.answer == str(int(a) - int(b))


def test_operand_digits_respect_config():
  task = ArithmeticTask(min_digits=2, max_digits=3, mul_max_digits=2, seed=1)
  problems = [p for s in range(30) for p in task.train_batch(s, 32)]
  ops_seen = set()
  for p in problems:
    a, op, b = _PROMPT.fullmatch(p.prompt).groups()
    ops_seen.add(op)
    hi = 2 if op == "*" else 3
    assert 2 <= len(a) <= hi and 2 <= len(b) <= hi, p
  assert ops_seen == {"+", "-", "*"}


def test_digit_counts_are_drawn_uniformly():
  # 1-2 digits: half of the first operands should have one digit, although
  # only 10 of the 100 values do.
  firsts = [_PROMPT.fullmatch(p.prompt).group(1)
            for s in range(100) for p in _DEFAULT.train_batch(s, 64)]
  share = np.mean([len(a) == 1 for a in firsts])
  assert 0.45 < share < 0.55, share
  # The test ordering uses the same weights, without replacement (which
  # depletes the few 1-digit problems, hence the lower share); drawing test
  # problems uniformly would give about 0.1.
  firsts = [_PROMPT.fullmatch(p.prompt).group(1)
            for p in _DEFAULT.test_set(200)]
  share = np.mean([len(a) == 1 for a in firsts])
  assert 0.25 < share < 0.6, share


def test_max_lengths():
  assert max_prompt_length(ArithmeticConfig()) == 6       # "99*99="
  assert max_answer_length(ArithmeticConfig()) == 4       # "9801"
  cfg = ArithmeticConfig(max_digits=2, mul_max_digits=1)
  assert max_answer_length(cfg) == 3                      # "198", "-99"
  assert max_answer_length(ArithmeticConfig(ops=("-",))) == 3  # "-99"
  assert max_answer_length(ArithmeticConfig(max_digits=1, ops=("-",))) == 2
  assert _LARGE.max_prompt_length == 14
  assert _LARGE.max_answer_length == 12
  # Exact: equal to the longest problem of the enumerated space.
  task = ArithmeticTask(max_digits=2, ops=("+", "-"), test_fraction=0.5)
  everything = task.test_set(task.num_problems("test"))
  assert max(len(p.prompt) for p in everything) <= task.max_prompt_length
  assert max(len(p.answer) for p in everything) <= task.max_answer_length


def test_sft_target_round_trips_through_tokenizer():
  tok = CharTokenizer()
  for p in _DEFAULT.test_set(50):
    target = tok.encode(p.answer, add_eos=True)
    assert target[-1] == tok.eos_id
    assert tok.decode(target + [4, 5]) == p.answer
    assert len(p.prompt) <= _DEFAULT.max_prompt_length


# ----------------------------------------------------------- determinism --


def test_same_seed_same_problems_different_seed_different():
  a = ArithmeticTask(seed=7)
  b = ArithmeticTask(ArithmeticConfig(seed=7))
  c = ArithmeticTask(seed=8)
  assert a.test_set(100) == b.test_set(100)
  assert a.train_batch(3, 32) == b.train_batch(3, 32)
  assert a.test_set(100) != c.test_set(100)
  assert a.train_batch(3, 32) != c.train_batch(3, 32)
  assert a.train_batch(3, 32) != a.train_batch(4, 32)


@pytest.mark.parametrize("kwargs", [{}, {"max_digits": 6}], ids=["enum", "large"])
def test_train_batch_is_pure_function_of_step(kwargs):
  uninterrupted = ArithmeticTask(seed=3, **kwargs)
  history = [uninterrupted.train_batch(s, 16) for s in range(10)]
  resumed = ArithmeticTask(seed=3, **kwargs)  # Fresh process state, step 7.
  assert resumed.train_batch(7, 16) == history[7]
  assert resumed.train_batch(9, 16) == history[9]
  assert resumed.train_batch(2, 16) == history[2]


@pytest.mark.parametrize("kwargs", [{}, {"max_digits": 6}], ids=["enum", "large"])
def test_test_set_is_a_fixed_prefix(kwargs):
  long = ArithmeticTask(seed=2, **kwargs).test_set(500)
  short = ArithmeticTask(seed=2, **kwargs).test_set(40)
  assert short == long[:40]
  assert len({p.prompt for p in long}) == 500
  growing = ArithmeticTask(seed=2, **kwargs)  # one task asked for more
  assert [growing.test_set(n) for n in (40, 39, 500)] == [short, short[:39],
                                                          long]


def test_tasks_of_one_config_share_a_read_only_enumeration():
  a, b = ArithmeticTask(seed=12), ArithmeticTask(ArithmeticConfig(seed=12))
  c = ArithmeticTask(seed=13)
  enum = a._enumeration()  # pylint: disable=protected-access
  assert b._enumeration() is enum  # pylint: disable=protected-access
  assert c._enumeration() is not enum  # pylint: disable=protected-access
  assert not any(array.flags.writeable for array in enum.values())
  assert a.train_batch(5, 8) == b.train_batch(5, 8) != c.train_batch(5, 8)


def test_split_does_not_depend_on_python_hash_seed():
  code = ("from rlax_llm.data.arithmetic import ArithmeticTask as T;"
          "t=T(seed=11);print(t.num_problems('test'),t.test_set(5),"
          "t.train_batch(4, 5))")
  outs = {
      subprocess.run([sys.executable, "-c", code], check=True, text=True,
                     capture_output=True,
                     env={"PYTHONHASHSEED": seed}).stdout
      for seed in ("1", "2")
  }
  assert len(outs) == 1
  t = ArithmeticTask(seed=11)
  assert outs.pop().startswith(str(t.num_problems("test")))


def test_golden_split_sizes():
  # BLAKE2b keyed by the seed is stable across platforms and versions.
  assert _DEFAULT.num_problems("all") == 30_000
  assert _DEFAULT.num_problems("test") == 2856
  assert _DEFAULT.num_problems("train") == 27_144


# ---------------------------------------------------------------- splits --


def test_train_and_test_are_disjoint():
  test_prompts = {p.prompt for p in
                  _DEFAULT.test_set(_DEFAULT.num_problems("test"))}
  assert len(test_prompts) == 2856
  train_prompts = {p.prompt for s in range(300)
                   for p in _DEFAULT.train_batch(s, 64)}
  assert len(train_prompts) > 5000
  assert not train_prompts & test_prompts
  assert {_DEFAULT.split_of(p) for p in test_prompts} == {"test"}
  assert {_DEFAULT.split_of(p) for p in train_prompts} == {"train"}


def test_train_and_test_are_disjoint_large_space():
  test_prompts = {p.prompt for p in _LARGE.test_set(2000)}
  train_prompts = {p.prompt for s in range(100)
                   for p in _LARGE.train_batch(s, 64)}
  assert not train_prompts & test_prompts
  assert {_LARGE.split_of(p) for p in test_prompts} == {"test"}
  assert {_LARGE.split_of(p) for p in train_prompts} == {"train"}


def test_commuted_problems_share_a_split():
  for p in _DEFAULT.test_set(500):
    a, op, b = _PROMPT.fullmatch(p.prompt).groups()
    if op in "+*":
      assert _DEFAULT.split_of(f"{b}{op}{a}=") == "test"


def test_small_space_is_enumerated_exactly():
  task = ArithmeticTask(max_digits=1, ops=("+",), test_fraction=0.2)
  assert task.is_enumerated
  assert task.num_problems("all") == 100
  n_test = task.num_problems("test")
  assert 0 < n_test < 100
  assert n_test + task.num_problems("train") == 100
  everything = task.test_set(n_test)
  assert len(set(everything)) == n_test
  assert all(len(p.prompt) == 4 for p in everything)
  with pytest.raises(ValueError, match=rf"holds {n_test}\b") as err:
    task.test_set(n_test + 1)
  assert "test_fraction" in str(err.value)
  assert task.test_set(0) == []
  batch = task.train_batch(0, 1000)  # With replacement: more than the split.
  assert len(batch) == 1000
  assert {p.prompt for p in batch}.isdisjoint(p.prompt for p in everything)


def test_large_space_limits_test_set_size():
  assert not _LARGE.is_enumerated
  assert _LARGE.num_problems("all") == 3 * 10**12
  assert _LARGE.num_problems("test") == 3 * 10**11  # Expected, not counted.
  assert _LARGE.num_problems("train") == 27 * 10**11
  with pytest.raises(ValueError, match="Ask for at most"):
    _LARGE.test_set(_LARGE.num_problems("test"))


def test_empty_train_split_error():
  # A near-1 test fraction on a 100-problem space sends every problem to test.
  task = ArithmeticTask(max_digits=1, ops=("*",), test_fraction=0.999999)
  assert task.num_problems("train") == 0
  with pytest.raises(ValueError, match="train split is empty"):
    task.train_batch(0, 4)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"min_digits": 2, "max_digits": 1}, r"max_digits=1 .* min_digits=2"),
    ({"min_digits": 0}, r"min_digits must be >= 1"),
    ({"max_digits": 19}, r"max_digits=19"),
    ({"ops": ("+", "/")}, r"unknown operator '/'"),
    ({"ops": ()}, r"ops is empty"),
    ({"ops": ("+", "+")}, r"repeats an operator"),
    ({"mul_max_digits": 1, "min_digits": 2, "max_digits": 3},
     r"mul_max_digits=1 .* min_digits=2"),
    ({"test_fraction": 0.0}, r"test_fraction"),
    ({"test_fraction": 1.0}, r"test_fraction"),
    ({"seed": -1}, r"seed"),
    ({"max_digits": 2.5}, r"max_digits must be an int"),
])
def test_invalid_config_errors(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    ArithmeticConfig(**kwargs)


def test_task_argument_errors():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_digit'\]"):
    ArithmeticTask(max_digit=3)
  with pytest.raises(ValueError, match="step must be a non-negative int"):
    _DEFAULT.train_batch(-1, 4)
  with pytest.raises(ValueError, match="batch_size"):
    _DEFAULT.train_batch(0, 2.0)
  with pytest.raises(ValueError, match="Unknown split 'valid'"):
    _DEFAULT.num_problems("valid")
  with pytest.raises(ValueError, match="not an arithmetic prompt"):
    _DEFAULT.split_of("1/2=")
  assert ArithmeticConfig(ops=["+", "-"]).ops == ("+", "-")
  assert ArithmeticConfig(ops="+*").ops == ("+", "*")


# -------------------------------------------------------------- verifier --


@pytest.mark.parametrize("completion, answer, expected", [
    ("42", "42", 1.0),
    (" 42 ", "42", 1.0),
    ("42\n", "42", 1.0),
    ("-14", "-14", 1.0),
    ("-0", "0", 1.0),
    ("0", "-0", 1.0),
    ("+42", "42", 1.0),
    ("042", "42", 1.0),
    ("42", 42, 1.0),
    ("-14", np.int64(-14), 1.0),
    ("4 2", "42", 0.0),
    ("42.0", "42", 0.0),
    ("42 apples", "42", 0.0),
    ("", "42", 0.0),
    ("   ", "0", 0.0),
    ("abc", "42", 0.0),
    ("14", "-14", 0.0),
    ("--14", "-14", 0.0),
    ("- 14", "-14", 0.0),
    ("43", "42", 0.0),
    (None, "42", 0.0),
    (b"42", "42", 0.0),
    (42, "42", 0.0),
    ("42", None, 0.0),
    ("42", 42.0, 0.0),
    ("1", True, 0.0),
    ("42", "forty-two", 0.0),
    ("\uff14\uff12", "42", 0.0),  # Full-width digits.
    ("\u0664\u0662", "42", 0.0),  # Arabic-Indic digits.
    ("42", "\uff14\uff12", 0.0),
])
def test_verify_hand_cases(completion, answer, expected):
  result = verify(completion, answer)
  assert type(result) is float
  assert result == expected


def test_verify_caps_work_on_huge_strings():
  calls = []

  class Tracked(str):

    def strip(self, *args):
      calls.append(len(self))
      return super().strip(*args)

  assert verify(Tracked("4" * 1000), "4" * 1000) == 1.0
  assert calls == [1000]
  huge = Tracked("1" * (1 << 20))
  assert verify(huge, "1" * (1 << 20)) == 0.0
  assert calls == [1000]  # The 1 MB string was never processed.


def test_verify_survives_hostile_str_subclass():

  class Hostile(str):

    def strip(self, *args):
      raise RuntimeError("boom")

  assert verify(Hostile("42"), "42") == 0.0


@given(st.one_of(st.text(), st.none(), st.binary(), st.integers()),
       st.one_of(st.text(), st.integers(), st.none(), st.floats()))
def test_verify_never_raises(completion, answer):
  assert verify(completion, answer) in (0.0, 1.0)


@given(st.integers(min_value=-10**30, max_value=10**30))
def test_verify_integers(n):
  assert verify(str(n), str(n)) == 1.0
  assert verify(f"  {n}\t", n) == 1.0
  assert verify(str(n + 1), str(n)) == 0.0
  assert verify(str(-n), str(n)) == (1.0 if n == 0 else 0.0)


def test_batch_verify():
  rewards = batch_verify(["42", " -14", "x", None], ["42", "-14", "1", "1"])
  assert rewards.dtype == np.float32
  np.testing.assert_array_equal(rewards, [1.0, 1.0, 0.0, 0.0])
  assert batch_verify([], []).shape == (0,)
  with pytest.raises(ValueError, match="2 completions but 1 answers"):
    batch_verify(["1", "2"], ["1"])


def test_verifier_scores_task_answers():
  problems = _DEFAULT.test_set(100)
  answers = [p.answer for p in problems]
  np.testing.assert_array_equal(batch_verify(answers, answers), 1.0)
  wrong = [str(int(a) + 1) for a in answers]
  np.testing.assert_array_equal(batch_verify(wrong, answers), 0.0)
