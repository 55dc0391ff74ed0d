"""Isolated reward execution: a process pool with per-item timeouts.

``RewardRunner(fn)`` scores a batch of completions in worker processes.
Every item gets its own deadline (``timeout_s``, counted from when the
item is handed to a worker). An item whose function raises, returns a
non-finite or non-numeric value, or kills its worker (``os._exit``, a
segfault) scores 0.0 and counts as an error; an item past its deadline
scores 0.0 and counts as a timeout, and its worker is killed (SIGKILL).
A dead or killed worker is replaced by a fresh one, so the pool keeps
serving later items and later steps; training never stops on a bad reward.

Guarantees and conventions:
  * Output order is the input order, whatever order workers finish in.
  * ``fn`` must be picklable: a top-level function, a ``functools.partial``
    of one, or an instance of a top-level class. It is called as
    ``fn(completion, **kwargs)`` with the item's keyword arguments and must
    return a number.
  * Workers are started with ``forkserver`` (default; ``spawn`` also
    works), never plain ``fork``: JAX in the parent is multithreaded and
    forking it is unsafe. A worker imports ``fn``'s module once when it
    starts (this is not counted against any item's deadline; a worker
    that cannot start within ``startup_timeout_s`` raises ``RuntimeError``
    in the parent, since that is a configuration error, not a bad item).
  * The pool lives until ``close()`` (or the end of a ``with`` block) and
    is reused by every ``score`` call. A runner is used from one thread.

Reward composition. ``compose(correctness=(1.0, f), format=(0.1, g))``
builds a picklable ``ComposedReward`` whose value is the weighted sum of
its components. Each component receives only the item keyword arguments
its signature accepts (all of them if it takes ``**kwargs``). Run through
a runner, each component's raw scores come back in
``RewardResult.components`` and their means in ``RewardResult.metrics()``
as ``reward/<name>``; a failing item scores 0.0 in every component.
Ready components: ``boxed_format`` (1.0 if the completion has a
``\\boxed{}``) and ``LengthPenalty`` (0 up to a budget of characters, then
down to -1 linearly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import inspect
import math
import multiprocessing
from multiprocessing import connection as mp_connection
import pickle
import signal
import time
from typing import Any, NamedTuple

import numpy as np


__all__ = [
    "ComposedReward",
    "LengthPenalty",
    "RewardResult",
    "RewardRunner",
    "boxed_format",
    "compose",
]


# ---------------------------------------------------------- composition --


def boxed_format(completion: Any, **unused_kwargs) -> float:
  """1.0 if the completion puts an answer in a (balanced) ``\\boxed{}``."""
  # Imported here: the math verifier loads sympy, which only math rewards need.
  from rlax_llm.rewards import math as math_rewards  # pylint: disable=g-import-not-at-top
  if (not isinstance(completion, str)
      or len(completion) > math_rewards.MAX_COMPLETION_CHARS):
    return 0.0
  content = math_rewards.last_boxed(completion)
  return 1.0 if content is not None and content.strip() else 0.0


@dataclasses.dataclass(frozen=True)
class LengthPenalty:
  """Penalises completions over a length budget (in characters).

  ``penalty = -min(1, max(0, len(completion) - budget_chars) / ramp_chars)``:
  0.0 within the budget, -1.0 at ``budget_chars + ramp_chars`` and beyond.
  Characters are used because rewards see decoded text; for a token budget
  use ``rlax_llm.core`` overlong shaping on token lengths instead.
  """
  budget_chars: int
  ramp_chars: int = 1000

  def __post_init__(self):
    if self.budget_chars < 0 or self.ramp_chars < 1:
      raise ValueError(
          f"LengthPenalty needs budget_chars >= 0 and ramp_chars >= 1, got "
          f"{self.budget_chars} and {self.ramp_chars}.")

  def __call__(self, completion: Any, **unused_kwargs) -> float:
    length = len(completion) if isinstance(completion, str) else 0
    return -min(1.0, max(0, length - self.budget_chars) / self.ramp_chars)


def _accepted_kwargs(fn: Callable[..., Any]) -> frozenset[str] | None:
  """Names of keyword arguments ``fn`` takes, None if it takes ``**kw``."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return None
  names = []
  for i, p in enumerate(params):
    if p.kind is inspect.Parameter.VAR_KEYWORD:
      return None
    if i > 0 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            inspect.Parameter.KEYWORD_ONLY):
      names.append(p.name)
  return frozenset(names)


@dataclasses.dataclass(frozen=True)
class ComposedReward:
  """Weighted sum of named reward components (build with ``compose``).

  Attributes:
    names: Component names, in the order given.
    weights: One weight per component.
    fns: One function ``fn(completion, **kwargs) -> float`` per component.
    accepts: Per component, the keyword names it accepts (None: all).
  """
  names: tuple[str, ...]
  weights: tuple[float, ...]
  fns: tuple[Callable[..., Any], ...]
  accepts: tuple[frozenset[str] | None, ...]

  def component_scores(self, completion: Any, **kwargs) -> dict[str, float]:
    """Each component's raw score (unweighted), in ``names`` order."""
    scores = {}
    for name, fn, accepts in zip(self.names, self.fns, self.accepts):
      passed = kwargs if accepts is None else {
          k: v for k, v in kwargs.items() if k in accepts}
      scores[name] = _finite(fn(completion, **passed), name)
    return scores

  def combine(self, scores: Mapping[str, float]) -> float:
    """The weighted sum of component scores."""
    return float(sum(w * scores[n] for n, w in zip(self.names, self.weights)))

  def __call__(self, completion: Any, **kwargs) -> float:
    return self.combine(self.component_scores(completion, **kwargs))


def compose(**weighted_components: Any) -> ComposedReward:
  """Builds a weighted sum of reward components.

  Example::

    reward = compose(
        correctness=(1.0, functools.partial(math.verify, style="math")),
        format=(0.1, boxed_format),
        length=(0.5, LengthPenalty(budget_chars=4000)))
    reward("... \\\\boxed{2}", answer="2")   # 1.0 + 0.1 + 0.0

  Args:
    **weighted_components: ``name=(weight, fn)`` or ``name=fn`` (weight 1).

  Returns:
    A picklable ``ComposedReward``.

  Raises:
    ValueError: With no components or a non-finite weight.
    TypeError: If a component is not callable.
  """
  if not weighted_components:
    raise ValueError("compose needs at least one component, e.g. "
                     "compose(correctness=(1.0, fn)).")
  names, weights, fns = [], [], []
  for name, spec in weighted_components.items():
    weight, fn = spec if isinstance(spec, tuple) else (1.0, spec)
    if not callable(fn):
      raise TypeError(f"component {name!r} must be callable or a (weight, "
                      f"callable) pair; got {type(fn).__name__}.")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight):
      raise ValueError(f"component {name!r} has weight {weight!r}; use a "
                       "finite number.")
    names.append(name)
    weights.append(float(weight))
    fns.append(fn)
  return ComposedReward(tuple(names), tuple(weights), tuple(fns),
                        tuple(_accepted_kwargs(f) for f in fns))


def _finite(value: Any, what: str) -> float:
  if isinstance(value, (bool, np.bool_)):
    value = float(value)
  if not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{what} returned {type(value).__name__}, not a number")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{what} returned {value}")
  return value


# --------------------------------------------------------------- worker --


def _evaluate(fn: Callable[..., Any], completion: Any,
              kwargs: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
  if isinstance(fn, ComposedReward):
    scores = fn.component_scores(completion, **kwargs)
    return fn.combine(scores), scores
  return _finite(fn(completion, **kwargs), "reward function"), {}


def _worker_main(fn: Callable[..., Any], conn: mp_connection.Connection):
  """Worker loop: receive ``(index, completion, kwargs)``, send a result."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent handles Ctrl-C.
  conn.send(("ready",))
  while True:
    try:
      message = conn.recv_bytes()
    except (EOFError, OSError):
      return
    if not message:
      return
    index, completion, kwargs = pickle.loads(message)
    try:
      total, scores = _evaluate(fn, completion, kwargs)
      reply = ("ok", index, total, scores)
    except BaseException as e:  # pylint: disable=broad-except
      reply = ("error", index, f"{type(e).__name__}: {e}"[:500], {})
    try:
      conn.send(reply)
    except (EOFError, OSError):
      return


# --------------------------------------------------------------- runner --


def _modules_of(fn: Any) -> set[str]:
  """Modules that unpickling ``fn`` in a worker imports."""
  if isinstance(fn, ComposedReward):
    return set().union(*(_modules_of(f) for f in fn.fns))
  if isinstance(fn, functools.partial):
    return _modules_of(fn.func)
  module = getattr(fn, "__module__", None) or type(fn).__module__
  return {module} if isinstance(module, str) else set()


def _preload_in_forkserver(fn: Any) -> None:
  """Has the forkserver import this module and ``fn``'s before forking.

  Workers are forked from the forkserver process. With these modules
  already imported there, a worker (and every replacement of one killed
  after a timeout or a crash) starts in milliseconds instead of importing
  the package anew, which takes seconds and stalls the batch it serves.
  Takes effect when the forkserver starts (the first worker of the
  process); `multiprocessing` ignores a preload that fails to import.
  """
  from multiprocessing import forkserver  # pylint: disable=g-import-not-at-top
  current = getattr(getattr(forkserver, "_forkserver", None),
                    "_preload_modules", None) or ["__main__"]
  wanted = list(current) + sorted(
      m for m in {__name__} | _modules_of(fn)
      if m not in current and m != "__main__" and not m.startswith("_"))
  if wanted != list(current):
    forkserver.set_forkserver_preload(wanted)


class RewardResult(NamedTuple):
  """Scores of one batch.

  Attributes:
    rewards: float32 [N], the reward per completion (0.0 for failed items).
    errors: Items whose function raised, returned a bad value or crashed.
    timeouts: Items that ran past the deadline.
    components: For a ``ComposedReward``, name -> float32 [N] raw
      component scores; empty otherwise.
  """
  rewards: np.ndarray
  errors: int
  timeouts: int
  components: dict[str, np.ndarray]

  def metrics(self) -> dict[str, float]:
    """``reward/mean``, ``reward/errors``, ``reward/timeouts`` and
    ``reward/<component>`` means, as Python floats for a metric writer."""
    n = max(len(self.rewards), 1)
    out = {
        "reward/mean": float(np.sum(self.rewards, dtype=np.float64) / n),
        "reward/errors": float(self.errors),
        "reward/timeouts": float(self.timeouts),
    }
    for name, values in self.components.items():
      out[f"reward/{name}"] = float(np.sum(values, dtype=np.float64) / n)
    return out


@dataclasses.dataclass
class _Slot:
  process: Any
  conn: mp_connection.Connection
  started: float
  ready: bool = False
  index: int | None = None  # The item it is working on.
  deadline: float = 0.0


class RewardRunner:
  """Scores completions in a pool of worker processes (module docstring).

  Usage::

    with RewardRunner(functools.partial(math.verify, style="gsm8k"),
                      num_workers=2, timeout_s=5.0) as runner:
      result = runner.score(texts, [{"answer": a} for a in answers])
      writer.write(step, result.metrics())
  """

  def __init__(self, fn: Callable[..., Any], *, num_workers: int = 2,
               timeout_s: float = 5.0, start_method: str = "forkserver",
               startup_timeout_s: float = 120.0):
    """Starts the workers and waits until each is ready.

    Args:
      fn: Picklable ``fn(completion, **kwargs) -> float``.
      num_workers: Worker processes (>= 1).
      timeout_s: Per-item deadline in seconds (> 0).
      start_method: ``"forkserver"`` or ``"spawn"``.
      startup_timeout_s: Time a worker may take to start and import ``fn``.

    Raises:
      ValueError: On a bad argument.
      RuntimeError: If a worker cannot start (e.g. ``fn`` cannot be pickled
        or imported in a fresh process).
    """
    if not callable(fn):
      raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
    if start_method not in ("forkserver", "spawn"):
      raise ValueError(
          f"start_method must be 'forkserver' or 'spawn', got "
          f"{start_method!r}; plain fork is unsafe with JAX in the parent.")
    self._fn = fn
    self._timeout_s = float(timeout_s)
    self._startup_timeout_s = float(startup_timeout_s)
    self._ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
      _preload_in_forkserver(fn)
    self._slots: list[_Slot] = []
    self._closed = False
    self.restarts = 0  # Workers replaced after a crash or timeout.
    self.last_errors: list[str] = []  # Messages of the last score's errors.
    try:
      self._slots = [self._start() for _ in range(num_workers)]
      for slot in self._slots:
        self._await_ready(slot)
    except BaseException:
      self.close()
      raise

  @property
  def num_workers(self) -> int:
    return len(self._slots)

  def _start(self) -> _Slot:
    parent, child = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_worker_main, args=(self._fn, child),
                                daemon=True)
    try:
      process.start()
    except Exception as e:  # pylint: disable=broad-except
      parent.close()
      raise RuntimeError(
          f"could not start a reward worker ({type(e).__name__}: {e}); the "
          "reward function must be picklable: a top-level function, a "
          "functools.partial of one, or a top-level class instance.") from e
    finally:
      child.close()
    return _Slot(process, parent, started=time.monotonic())

  def _await_ready(self, slot: _Slot) -> None:
    """Marks a starting worker ready, or raises once it cannot be."""
    left = slot.started + self._startup_timeout_s - time.monotonic()
    if slot.conn.poll(max(0.0, left)):
      try:
        if slot.conn.recv() == ("ready",):
          slot.ready = True
          return
      except (EOFError, OSError):
        pass
    self._kill(slot)
    raise RuntimeError(
        "a reward worker did not start (exit code "
        f"{slot.process.exitcode}); check that the reward function and its "
        "module import cleanly in a fresh process (python -c 'import ...').")

  @staticmethod
  def _kill(slot: _Slot) -> None:
    if slot.process.is_alive():
      slot.process.kill()
    slot.process.join(5.0)
    slot.conn.close()

  def _replace(self, i: int) -> None:
    self._kill(self._slots[i])
    self._slots[i] = self._start()
    self.restarts += 1

  def score(self, completions: Sequence[Any],
            kwargs_list: Sequence[Mapping[str, Any]] | None = None
            ) -> RewardResult:
    """Scores N completions; never raises for a bad item.

    Args:
      completions: N completions (any picklable objects; usually ``str``).
      kwargs_list: N dicts of keyword arguments for ``fn`` (e.g.
        ``{"answer": "42"}``); None for none.

    Returns:
      A ``RewardResult`` in input order.

    Raises:
      ValueError: If the two sequences differ in length.
      RuntimeError: If the runner is closed or a replacement worker
        cannot start.
    """
    if self._closed:
      raise RuntimeError("RewardRunner is closed; create a new one.")
    completions = list(completions)
    n = len(completions)
    kwargs_list = [{}] * n if kwargs_list is None else list(kwargs_list)
    if len(kwargs_list) != n:
      raise ValueError(
          f"score got {n} completions but {len(kwargs_list)} kwargs dicts; "
          "pass one dict per completion.")
    rewards = np.zeros(n, np.float32)
    component_names = (self._fn.names if isinstance(self._fn, ComposedReward)
                       else ())
    components = {name: np.zeros(n, np.float32) for name in component_names}
    errors = timeouts = 0
    self.last_errors = []
    todo = list(range(n - 1, -1, -1))  # Popped from the end: index order.

    while True:
      now = time.monotonic()
      for i, slot in enumerate(self._slots):
        if slot.ready and slot.index is None and todo:
          index = todo.pop()
          try:
            payload = pickle.dumps(
                (index, completions[index], dict(kwargs_list[index])))
          except Exception as e:  # pylint: disable=broad-except
            errors += 1  # The item itself cannot be sent.
            self.last_errors.append(f"item {index}: {type(e).__name__}: {e}")
            continue
          try:
            slot.conn.send_bytes(payload)
          except OSError:  # Died while idle: replace it and retry the item.
            todo.append(index)
            self._replace(i)
            continue
          slot.index, slot.deadline = index, now + self._timeout_s
      busy = [s for s in self._slots if s.index is not None]
      starting = [s for s in self._slots if not s.ready]
      if not busy and not todo:
        break
      waits = [s.deadline for s in busy] or [now + self._startup_timeout_s]
      handles = [s.conn for s in busy + starting]
      handles += [s.process.sentinel for s in busy + starting]
      mp_connection.wait(handles, timeout=max(0.0, min(waits) - now))

      now = time.monotonic()
      for i, slot in enumerate(self._slots):
        if not slot.ready:
          if (slot.conn.poll(0) or not slot.process.is_alive()
              or now > slot.started + self._startup_timeout_s):
            self._await_ready(slot)
          continue
        if slot.index is None:
          continue
        reply = None
        try:
          if slot.conn.poll(0):
            reply = slot.conn.recv()
        except (EOFError, OSError):
          reply = ("dead",)
        if reply is None and not slot.process.is_alive():
          reply = ("dead",)
        if reply == ("dead",):
          slot.process.join(1.0)  # Collect the exit code for the message.
        if reply is None:
          if now >= slot.deadline:
            timeouts += 1
            self.last_errors.append(
                f"item {slot.index}: timed out after {self._timeout_s} s")
            slot.index = None
            self._replace(i)
          continue
        if reply[0] == "ok" and reply[1] == slot.index:
          rewards[slot.index] = reply[2]
          for name, value in reply[3].items():
            components[name][slot.index] = value
          slot.index = None
        else:
          errors += 1
          self.last_errors.append(
              f"item {slot.index}: " + (reply[2] if reply[0] == "error" else
                                        "worker died (exit code "
                                        f"{slot.process.exitcode})"))
          slot.index = None
          if reply[0] != "error":
            self._replace(i)
    return RewardResult(rewards, errors, timeouts, components)

  def close(self) -> None:
    """Stops the workers (idempotent)."""
    self._closed = True
    for slot in self._slots:
      try:
        if slot.process.is_alive() and slot.index is None:
          slot.conn.send_bytes(b"")
      except (OSError, ValueError):
        pass
    deadline = time.monotonic() + 2.0
    for slot in self._slots:
      slot.process.join(max(0.0, deadline - time.monotonic()))
      self._kill(slot)
    self._slots = []

  def __enter__(self) -> RewardRunner:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
