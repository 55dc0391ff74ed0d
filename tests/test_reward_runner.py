"""Tests for rlax_llm.rewards.runner: isolation, timeouts, composition.

The reward functions below are top-level so the worker processes can
unpickle them. Workers are started once per module (a fresh worker imports
the package, which takes seconds on a busy machine).
"""

import functools
import os
import pickle
import signal
import time

import numpy as np
import pytest

from rlax_llm.rewards import math as rm
from rlax_llm.rewards import runner as rr

_TIMEOUT_S = 2.0
_PWNED = "/tmp/rlax_llm_runner_pwned"


def misbehaving_reward(completion, *, answer="1"):
  """Behaves by command: hang, exit, segfault, raise, or a bad value;
  otherwise the GSM8K verdict."""
  if completion == "hang":
    while True:
      time.sleep(1.0)
  if completion == "exit":
    os._exit(1)  # pylint: disable=protected-access
  if completion == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
  if completion == "raise":
    raise RuntimeError("reward bug")
  if completion == "nan":
    return float("nan")
  if completion == "string":
    return "1.0"
  return rm.verify(completion, answer, style="gsm8k")


def length_reward(completion):
  return float(len(completion))


@pytest.fixture(scope="module")
def pool():
  with rr.RewardRunner(misbehaving_reward, num_workers=2,
                       timeout_s=_TIMEOUT_S) as runner:
    yield runner


def test_good_items_in_order(pool):
  texts = [f"#### {i}" for i in range(20)]
  kwargs = [{"answer": str(i if i % 3 else -1)} for i in range(20)]
  result = pool.score(texts, kwargs)
  want = [0.0 if i % 3 == 0 else 1.0 for i in range(20)]
  assert result.rewards.dtype == np.float32
  assert result.rewards.tolist() == want
  assert (result.errors, result.timeouts) == (0, 0)
  # Reused across steps, with the same output.
  assert pool.score(texts, kwargs).rewards.tolist() == want


def test_failures_are_scored_zero_and_counted(pool):
  restarts = pool.restarts
  texts = ["#### 1", "hang", "#### 1", "exit", "raise", "segfault", "nan",
           "string", "#### 2", "#### 1"]
  start = time.monotonic()
  result = pool.score(texts)
  elapsed = time.monotonic() - start
  assert result.rewards.tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
  assert result.timeouts == 1
  assert result.errors == 5  # exit, raise, segfault, nan, string.
  assert pool.restarts == restarts + 3  # hang, exit, segfault.
  assert elapsed >= _TIMEOUT_S
  assert any("timed out" in e for e in pool.last_errors)
  assert any("worker died" in e for e in pool.last_errors)
  assert any("RuntimeError: reward bug" in e for e in pool.last_errors)
  assert result.metrics() == {"reward/mean": 0.3, "reward/errors": 5.0,
                              "reward/timeouts": 1.0}
  # The pool recovered: every worker alive, all items served again.
  assert pool.num_workers == 2
  again = pool.score(["#### 1"] * 4)
  assert again.rewards.tolist() == [1.0] * 4 and again.errors == 0


def test_length_mismatch_and_empty(pool):
  with pytest.raises(ValueError, match="one dict per completion"):
    pool.score(["a", "b"], [{}])
  empty = pool.score([])
  assert empty.rewards.shape == (0,) and empty.errors == 0


def test_unpicklable_item_is_an_error(pool):
  result = pool.score(["#### 1", "#### 1"], [{"answer": "1"},
                                             {"answer": lambda: 1}])
  assert result.rewards.tolist() == [1.0, 0.0] and result.errors == 1


_ADVERSARIAL = [
    "7" * 1_000_000,
    "\\boxed{" + "{" * 10_000 + "7" + "}" * 10_000 + "}",
    "\\boxed{10^10^10^10}",
    f"\\boxed{{__import__('os').system('touch {_PWNED}')}}",
    "\\boxed{8}\udcff",
    b"\\boxed{8}",
    "",
    "\\boxed{8}",  # The one correct item.
]


def test_adversarial_inputs_through_runner():
  if os.path.exists(_PWNED):
    os.remove(_PWNED)
  fn = functools.partial(rm.verify, style="math")
  with rr.RewardRunner(fn, num_workers=1, timeout_s=rm.TIME_LIMIT_S + 3.0
                       ) as runner:
    result = runner.score(_ADVERSARIAL, [{"answer": "8"}] * len(_ADVERSARIAL))
  assert result.rewards.tolist() == [0.0] * (len(_ADVERSARIAL) - 1) + [1.0]
  assert (result.errors, result.timeouts) == (0, 0)
  assert not os.path.exists(_PWNED)


def test_close_and_bad_arguments():
  runner = rr.RewardRunner(length_reward, num_workers=1, timeout_s=5.0)
  # pylint: disable-next=protected-access
  processes = [slot.process for slot in runner._slots]
  assert runner.score(["abc", "de"]).rewards.tolist() == [3.0, 2.0]
  runner.close()
  runner.close()  # Idempotent.
  assert not any(p.is_alive() for p in processes)
  with pytest.raises(RuntimeError, match="closed"):
    runner.score(["a"])
  with pytest.raises(ValueError, match="num_workers"):
    rr.RewardRunner(length_reward, num_workers=0)
  with pytest.raises(ValueError, match="timeout_s"):
    rr.RewardRunner(length_reward, timeout_s=0)
  with pytest.raises(ValueError, match="unsafe with JAX"):
    rr.RewardRunner(length_reward, start_method="fork")
  with pytest.raises(RuntimeError, match="picklable"):
    rr.RewardRunner(lambda c: 1.0, num_workers=1)


# ---------------------------------------------------------- composition --


def _answer_only(completion, answer):
  return 1.0 if completion.strip() == answer else 0.0


def test_compose_in_process():
  reward = rr.compose(
      correctness=(1.0, functools.partial(rm.verify, style="math")),
      format=(0.1, rr.boxed_format),
      length=(0.5, rr.LengthPenalty(budget_chars=10, ramp_chars=20)))
  assert reward.names == ("correctness", "format", "length")
  # 9 characters: within budget.
  assert reward(r"\boxed{2}", answer="2") == pytest.approx(1.1)
  # 30 characters: 20 over a 20 ramp, full penalty: 0 + 0.1 - 0.5.
  text = r"\boxed{3}" + "x" * 21
  assert len(text) == 30
  assert reward(text, answer="2") == pytest.approx(-0.4)
  # 20 characters: half the penalty.
  assert reward.component_scores("y" * 20, answer="2") == {
      "correctness": 0.0, "format": 0.0, "length": -0.5}
  # Components get only the keyword arguments they accept.
  picky = rr.compose(exact=_answer_only, size=length_reward)
  assert picky("42", answer="42", unused="x") == 3.0
  assert pickle.loads(pickle.dumps(reward))(r"\boxed{2}", answer="2") == (
      pytest.approx(1.1))


def test_compose_rejects_bad_components():
  with pytest.raises(ValueError, match="at least one component"):
    rr.compose()
  with pytest.raises(TypeError, match="must be callable"):
    rr.compose(a=(1.0, "not a function"))
  with pytest.raises(ValueError, match="finite number"):
    rr.compose(a=(float("inf"), length_reward))
  with pytest.raises(ValueError, match="ramp_chars"):
    rr.LengthPenalty(budget_chars=10, ramp_chars=0)


def test_compose_through_runner():
  reward = rr.compose(
      correctness=(1.0, misbehaving_reward),
      format=(0.25, rr.boxed_format))
  texts = [r"\boxed{2}", "#### 2", "raise", r"#### 3 \boxed{}"]
  kwargs = [{"answer": "2"}] * 4
  with rr.RewardRunner(reward, num_workers=1, timeout_s=10.0) as runner:
    result = runner.score(texts, kwargs)
  np.testing.assert_allclose(result.rewards, [1.25, 1.0, 0.0, 0.0])
  assert result.errors == 1
  assert result.components["correctness"].tolist() == [1.0, 1.0, 0.0, 0.0]
  assert result.components["format"].tolist() == [1.0, 0.0, 0.0, 0.0]
  metrics = result.metrics()
  assert metrics["reward/correctness"] == pytest.approx(0.5)
  assert metrics["reward/format"] == pytest.approx(0.25)
  assert metrics["reward/mean"] == pytest.approx(2.25 / 4)
  assert metrics["reward/errors"] == 1.0
