"""RewardRunner under load: every worker hanging at once, a backlog of items.

Each item carries an identifiable payload (`"<id>:<behaviour>"`) and the
reward of a good item is a function of its id alone, so a reward attributed
to the wrong item shows as a wrong number. The reward function lives in
this module, which imports nothing heavy at its top: a worker (and every
replacement of a killed one) starts in well under a second.
"""

import os
import time

import numpy as np
import pytest


# The process that imported this module: in a worker forked from a
# forkserver that preloaded it, not the worker itself.
_IMPORTED_BY = os.getpid()


def payload_reward(completion, *, salt=0, record_dir=None):
  """`"<id>:<behaviour>"` -> id * 1.5 + salt, after the behaviour.

  With `record_dir`, first writes the wall time the item started at to
  `record_dir/<id>`.
  """
  ident, _, behaviour = completion.partition(":")
  if record_dir is not None:
    with open(os.path.join(record_dir, ident), "w") as f:
      f.write(repr(time.time()))
  if behaviour == "hang":
    while True:
      time.sleep(1.0)
  if behaviour.startswith("sleep"):
    time.sleep(float(behaviour[5:]))
  if behaviour == "exit":
    os._exit(3)  # pylint: disable=protected-access
  if behaviour == "raise":
    raise RuntimeError(f"item {ident} fails")
  if behaviour == "preloaded":
    return float(_IMPORTED_BY != os.getpid())
  return int(ident) * 1.5 + salt


def _want(items, salt=0):
  return np.asarray(
      [0.0 if b in ("hang", "exit", "raise") else 1.0 if b == "preloaded"
       else i * 1.5 + salt for i, b in items], np.float32)


def _runner(**kwargs):
  from rlax_llm.rewards import runner as rr  # pylint: disable=g-import-not-at-top
  return rr.RewardRunner(payload_reward, **kwargs)


def test_every_worker_hangs_at_once_deadlines_hold(tmp_path):
  timeout_s, workers = 1.0, 3
  # The first `workers` items hang together, then good ones; then another
  # wave of hangs mixed with crashes and errors, then good ones again.
  items = ([(i, "hang") for i in range(workers)]
           + [(i, "") for i in range(3, 9)]
           + [(9, "hang"), (10, "exit"), (11, "hang"), (12, "raise"),
              (13, "hang")]
           + [(i, "sleep0.01") for i in range(14, 20)])
  with _runner(num_workers=workers, timeout_s=timeout_s) as runner:
    replaced_at = []  # when the runner killed and replaced a worker
    replace = runner._replace  # pylint: disable=protected-access

    def recording_replace(i):
      replaced_at.append(time.time())
      replace(i)
    runner._replace = recording_replace  # pylint: disable=protected-access
    res = runner.score(
        [f"{i}:{b}" for i, b in items],
        [{"salt": 0.25, "record_dir": str(tmp_path)}] * len(items))
    np.testing.assert_array_equal(res.rewards, _want(items, 0.25))
    assert res.timeouts == 6
    assert res.errors == 2
    assert runner.restarts == 7  # 6 timed out + 1 crashed, all replaced
    assert sum("timed out" in m for m in runner.last_errors) == 6
    for i in (0, 1, 2, 9, 11, 13):
      assert any(m.startswith(f"item {i}: timed out") for m in
                 runner.last_errors)
    # Each hanging item was killed one deadline after it started, all three
    # of the first wave together (their deadlines run in parallel), however
    # long the replacement workers then took to start.
    started = sorted(float((tmp_path / str(i)).read_text())
                     for i in (0, 1, 2, 9, 11, 13))
    assert started[2] - started[0] < 0.5 * timeout_s  # the wave started together
    for t in started:
      late = [r - t - timeout_s for r in replaced_at
              if r >= t + timeout_s - 0.05]
      assert late and min(late) < 0.5 * timeout_s, (t, replaced_at)
    # Every item that ran was started once (nothing retried or lost).
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(20))
    # The pool keeps serving after every worker was killed.
    again = runner.score([f"{i}:" for i in range(30, 36)])
    np.testing.assert_array_equal(again.rewards, _want(
        [(i, "") for i in range(30, 36)]))
    assert again.timeouts == again.errors == 0


def test_backlog_waits_without_using_its_deadline():
  # 2 workers, 60 items of 40 ms: the last item waits ~1.2 s in the queue,
  # longer than the 0.6 s deadline; the deadline starts when a worker takes
  # an item, so nothing times out.
  timeout_s = 0.6
  items = [(i, "sleep0.04") for i in range(60)]
  with _runner(num_workers=2, timeout_s=timeout_s) as runner:
    t0 = time.monotonic()
    res = runner.score([f"{i}:{b}" for i, b in items])
    wall = time.monotonic() - t0
    assert wall > timeout_s  # the backlog really outlasted one deadline
    np.testing.assert_array_equal(res.rewards, _want(items))
    assert res.timeouts == res.errors == 0 and runner.restarts == 0
    # Back-to-back batches, each with a hang in the middle of the backlog:
    # only that item times out, every other reward stays with its item.
    for batch in range(3):
      base = 100 * (batch + 1)
      items = [(base + i, "hang" if i == 7 else "sleep0.01")
               for i in range(24)]
      res = runner.score([f"{i}:{b}" for i, b in items])
      np.testing.assert_array_equal(res.rewards, _want(items))
      assert (res.timeouts, res.errors) == (1, 0)
    assert runner.restarts == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_mix_keeps_every_reward_with_its_item(seed):
  # Random behaviours in random order with random short sleeps, so workers
  # finish out of order: every good item's reward is still its own.
  rng = np.random.default_rng(seed)
  behaviours = rng.choice(["", "sleep0.02", "sleep0.05", "raise", "exit"],
                          size=40, p=[0.4, 0.25, 0.2, 0.1, 0.05])
  items = [(int(i), str(b)) for i, b in zip(rng.permutation(1000)[:40],
                                            behaviours)]
  with _runner(num_workers=3, timeout_s=5.0) as runner:
    res = runner.score([f"{i}:{b}" for i, b in items])
  np.testing.assert_array_equal(res.rewards, _want(items))
  assert res.errors == sum(b in ("raise", "exit") for _, b in items)
  assert res.timeouts == 0


def test_replacement_workers_fork_with_the_reward_module_loaded():
  # Workers, and the replacements of killed ones, are forked from a
  # forkserver that has imported the reward function's module, so none of
  # them imports it (or the package) again: a replacement is ready at once
  # instead of stalling the batch for the seconds an import takes.
  from multiprocessing import forkserver  # pylint: disable=g-import-not-at-top
  forkserver._forkserver._stop()  # pylint: disable=protected-access
  items = [(0, "preloaded"), (1, "hang"), (2, "exit"), (3, "preloaded"),
           (4, "preloaded"), (5, "")]
  with _runner(num_workers=2, timeout_s=1.0) as runner:
    res = runner.score([f"{i}:{b}" for i, b in items])
    assert runner.restarts == 2
  np.testing.assert_array_equal(res.rewards, _want(items))
  assert (res.timeouts, res.errors) == (1, 1)
