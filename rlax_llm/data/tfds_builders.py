"""TFDS builders for the project's tasks, written as ArrayRecord files.

Four builders turn the tasks into TFDS datasets that are read back by random
access (``tfds.data_source`` / ``builder.as_data_source``) and fed to the
grain pipeline of ``rlax_llm.data.pipeline``. Preparing and reading them needs
no TensorFlow: the ``array_record`` file format is written and read through
the ``array_record`` package, and the features used here (scalars, text,
variable-length integer vectors) decode with NumPy.

  ===================  ==========================================  ==========
  name                 source                                      splits
  ===================  ==========================================  ==========
  ``rlax_arithmetic``  ``rlax_llm.data.arithmetic.ArithmeticTask`` train, test
  ``rlax_countdown``   ``rlax_llm.data.countdown.CountdownTask``   train, test
  ``rlax_gsm8k``       local GSM8K JSONL files                     train, test
  ``rlax_math500``     local MATH-500 JSONL file                   test
  ===================  ==========================================  ==========

Every record has an ``id`` feature equal to its position in the split (the
builders disable TFDS's key-hash shuffling), so ``source[i]["id"] == i`` and
record ``i`` is the ``i``-th example of the generator or the ``i``-th line of
the JSONL file. Text features come back as UTF-8 ``bytes``.

Synthetic splits. ``train`` holds ``train_size`` problems: the concatenation
of ``task.train_batch(step, TRAIN_CHUNK)`` for ``step = 0, 1, ...``, cut to
``train_size`` (draws with replacement, as in online training); ``test`` is
``task.test_set(test_size)`` (distinct problems). Train and test never share a
problem (see the task modules).

Example::

  builder = RlaxCountdown(config=CountdownBuilderConfig(
      name="small", train_size=1000, test_size=100, seed=3), data_dir=d)
  builder.download_and_prepare(file_format="array_record")
  test = builder.as_data_source(split="test")
  test[0]  # {'id': 0, 'prompt': b'numbers: ...', 'answer': b'88', ...}

or, in one call, ``load_source("rlax_countdown", "test", data_dir=d,
config=...)``. Predefined configs are read by name as usual, e.g.
``tfds.data_source("rlax_gsm8k", data_dir=d)`` once this module is imported
(importing it registers the builders).

A builder config is identified on disk by its name and version only: give a
custom config a new ``name`` whenever its fields change, or prepare it into a
new ``data_dir``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from rlax_llm.data.arithmetic import ArithmeticConfig
from rlax_llm.data.arithmetic import ArithmeticTask
from rlax_llm.data.countdown import CountdownConfig
from rlax_llm.data.countdown import CountdownTask

__all__ = [
    "ArithmeticBuilderConfig",
    "CountdownBuilderConfig",
    "DEFAULT_DATA_ROOT",
    "Gsm8kBuilderConfig",
    "Math500BuilderConfig",
    "RlaxArithmetic",
    "RlaxCountdown",
    "RlaxGsm8k",
    "RlaxMath500",
    "TRAIN_CHUNK",
    "gsm8k_final_answer",
    "load_source",
    "prepare",
]

# Train splits of the synthetic tasks are drawn in batches of this size.
TRAIN_CHUNK = 1024
# The data shipped beside the project: <repository>/../shared/data.
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / (
    "data")
_VERSION = tfds.core.Version("1.0.0")
_FILE_FORMAT = "array_record"


def _text():
  return tfds.features.Text()


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared base: locates the builder's source file without resource APIs.

  TFDS 4.9.x finds a builder's code through ``importlib_resources``, a
  package it only declares for Python < 3.9; the file path of the class is
  all it needs, and ``inspect`` gives it directly.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pytype: disable=signature-mismatch
    return epath.Path(inspect.getfile(cls))


# ------------------------------------------------------------ synthetic --


@dataclasses.dataclass(eq=False)
class ArithmeticBuilderConfig(tfds.core.BuilderConfig):
  """Config of ``rlax_arithmetic``: task parameters and split sizes.

  Attributes:
    min_digits, max_digits, ops, mul_max_digits, seed, test_fraction: The
      ``ArithmeticConfig`` fields (see ``rlax_llm.data.arithmetic``).
    train_size: Number of train records.
    test_size: Number of test records (distinct problems).
  """

  min_digits: int = 1
  max_digits: int = 2
  ops: tuple[str, ...] = ("+", "-", "*")
  mul_max_digits: int | None = None
  seed: int = 0
  test_fraction: float = 0.1
  train_size: int = 50_000
  test_size: int = 1_000

  def task(self) -> ArithmeticTask:
    """Returns the ``ArithmeticTask`` these fields describe."""
    return ArithmeticTask(ArithmeticConfig(
        min_digits=self.min_digits, max_digits=self.max_digits,
        ops=tuple(self.ops), mul_max_digits=self.mul_max_digits,
        seed=self.seed, test_fraction=self.test_fraction))


@dataclasses.dataclass(eq=False)
class CountdownBuilderConfig(tfds.core.BuilderConfig):
  """Config of ``rlax_countdown``: task parameters and split sizes.

  Attributes:
    num_numbers, min_number, max_number, min_target, max_target, ops, seed,
      test_fraction: The ``CountdownConfig`` fields (see
      ``rlax_llm.data.countdown``).
    train_size: Number of train records.
    test_size: Number of test records (distinct problems).
  """

  num_numbers: tuple[int, int] = (3, 4)
  min_number: int = 1
  max_number: int = 99
  min_target: int = 1
  max_target: int = 999
  ops: tuple[str, ...] = ("+", "-", "*", "/")
  seed: int = 0
  test_fraction: float = 0.1
  train_size: int = 50_000
  test_size: int = 1_000

  def task(self) -> CountdownTask:
    """Returns the ``CountdownTask`` these fields describe."""
    return CountdownTask(CountdownConfig(
        num_numbers=tuple(self.num_numbers), min_number=self.min_number,
        max_number=self.max_number, min_target=self.min_target,
        max_target=self.max_target, ops=tuple(self.ops), seed=self.seed,
        test_fraction=self.test_fraction))


def _check_sizes(config, builder_name: str) -> None:
  for field in ("train_size", "test_size"):
    value = getattr(config, field)
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(
          f"{builder_name} config {config.name!r}: {field} must be a positive "
          f"int, got {value!r}.")


def _train_problems(task, size: int):
  """``size`` train problems: consecutive ``train_batch`` chunks, cut."""
  for step in range(math.ceil(size / TRAIN_CHUNK)):
    take = min(TRAIN_CHUNK, size - step * TRAIN_CHUNK)
    yield from task.train_batch(step, TRAIN_CHUNK)[:take]


class RlaxArithmetic(_Builder):
  """Synthetic integer arithmetic (``"37+5="`` -> ``"42"``).

  Features: ``id`` (int64), ``prompt`` and ``answer`` (text).
  """

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ArithmeticBuilderConfig(
      name="default", description="1-2 digit + - *, seed 0.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": np.int64, "prompt": _text(), "answer": _text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated, nothing to download.
    _check_sizes(self.builder_config, self.name)
    task = self.builder_config.task()
    return {"train": self._generate_examples(task, "train"),
            "test": self._generate_examples(task, "test")}

  def _generate_examples(self, task, split):
    cfg = self.builder_config
    problems = (_train_problems(task, cfg.train_size) if split == "train"
                else task.test_set(cfg.test_size))
    for i, p in enumerate(problems):
      yield i, {"id": i, "prompt": p.prompt, "answer": p.answer}


class RlaxCountdown(_Builder):
  """Countdown: combine 3-4 numbers with ``+ - * /`` into a target.

  Features: ``id`` (int64), ``prompt``, ``answer`` (the target as text),
  ``numbers`` (int64 vector, as shown in the prompt), ``target`` (int64) and
  ``solution`` (one expression reaching the target).
  """

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [CountdownBuilderConfig(
      name="default", description="3-4 numbers in 1..99, targets 1..999.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "prompt": _text(),
            "answer": _text(),
            "numbers": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "target": np.int64,
            "solution": _text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    _check_sizes(self.builder_config, self.name)
    task = self.builder_config.task()
    return {"train": self._generate_examples(task, "train"),
            "test": self._generate_examples(task, "test")}

  def _generate_examples(self, task, split):
    cfg = self.builder_config
    problems = (_train_problems(task, cfg.train_size) if split == "train"
                else task.test_set(cfg.test_size))
    for i, p in enumerate(problems):
      yield i, {"id": i, "prompt": p.prompt, "answer": p.answer,
                "numbers": np.asarray(p.numbers, np.int64),
                "target": p.target, "solution": p.solution}


# ------------------------------------------------------------ JSONL sets --


@dataclasses.dataclass(eq=False)
class Gsm8kBuilderConfig(tfds.core.BuilderConfig):
  """Config of ``rlax_gsm8k``: where the JSONL files are.

  Each line is ``{"question": ..., "answer": ...}`` with the answer's worked
  solution ending in ``"#### <final answer>"``.

  Attributes:
    train_path: JSONL file of the train split.
    test_path: JSONL file of the test split.
  """

  train_path: str = str(DEFAULT_DATA_ROOT / "gsm8k" / "train.jsonl")
  test_path: str = str(DEFAULT_DATA_ROOT / "gsm8k" / "test.jsonl")


@dataclasses.dataclass(eq=False)
class Math500BuilderConfig(tfds.core.BuilderConfig):
  """Config of ``rlax_math500``: where the JSONL file is.

  Each line has ``problem``, ``solution``, ``answer``, ``subject``, ``level``
  and ``unique_id``.

  Attributes:
    test_path: JSONL file of the test split.
  """

  test_path: str = str(DEFAULT_DATA_ROOT / "math500" / "test.jsonl")


def gsm8k_final_answer(solution: str) -> str:
  """The final answer of a GSM8K solution: the text after ``####``, stripped.

  Args:
    solution: A GSM8K ``answer`` field, e.g. ``"... = 18.\\n#### 18"``.

  Returns:
    The final answer string, e.g. ``"18"``.

  Raises:
    ValueError: If ``solution`` holds no ``####`` marker.
  """
  head, sep, tail = solution.rpartition("####")
  del head
  if not sep:
    raise ValueError(
        "GSM8K solution has no '####' marker before its final answer: "
        f"{solution[-80:]!r}.")
  return tail.strip()


def _read_jsonl(path: str, *, builder_name: str, config_cls: type,
                field: str, required: tuple[str, ...]):
  """Yields ``(line_number, record)`` of a JSONL file, checking fields."""
  path = os.fspath(path)
  _check_exists(path, builder_name, config_cls, field)
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
            f"{builder_name}: {path}:{line_no} is not valid JSON ({e}).") from e
      missing = [k for k in required if k not in record]
      if missing:
        raise ValueError(
            f"{builder_name}: {path}:{line_no} lacks field(s) {missing}; each "
            f"line needs {list(required)}.")
      yield line_no, record


class RlaxGsm8k(_Builder):
  """GSM8K grade-school math word problems, from local JSONL files.

  Features: ``id`` (int64, the 0-based line among non-empty lines),
  ``question``, ``answer`` (the final answer: the text after ``####``,
  stripped) and ``solution`` (the full worked solution, marker included).

  With internet access, TFDS's own ``gsm8k`` dataset
  (``tfds.data_source("gsm8k")``) downloads the same problems; its answer
  feature is the full solution, so take the final answer with
  ``gsm8k_final_answer``.
  """

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [Gsm8kBuilderConfig(
      name="default", description="The files shipped beside the project.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": np.int64, "question": _text(), "answer": _text(),
            "solution": _text()}),
        homepage="https://github.com/openai/grade-school-math",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files.
    cfg = self.builder_config
    for field in ("train_path", "test_path"):
      _check_exists(getattr(cfg, field), self.name, type(cfg), field)
    return {"train": self._generate_examples("train_path"),
            "test": self._generate_examples("test_path")}

  def _generate_examples(self, field):
    cfg = self.builder_config
    path = getattr(cfg, field)
    rows = _read_jsonl(path, builder_name=self.name, config_cls=type(cfg),
                       field=field, required=("question", "answer"))
    for i, (line_no, row) in enumerate(rows):
      try:
        final = gsm8k_final_answer(row["answer"])
      except ValueError as e:
        raise ValueError(f"{self.name}: {path}:{line_no}: {e}") from None
      yield i, {"id": i, "question": row["question"], "answer": final,
                "solution": row["answer"]}


class RlaxMath500(_Builder):
  """MATH-500 competition problems, from a local JSONL file.

  Features: ``id`` (int64), ``problem``, ``answer`` (the reference final
  answer), ``solution`` (the worked solution), ``subject``, ``level`` (int64)
  and ``unique_id``.
  """

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [Math500BuilderConfig(
      name="default", description="The file shipped beside the project.")]
  _FIELDS = ("problem", "solution", "answer", "subject", "level", "unique_id")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": np.int64, "problem": _text(), "answer": _text(),
            "solution": _text(), "subject": _text(), "level": np.int64,
            "unique_id": _text()}),
        homepage="https://github.com/openai/prm800k",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    _check_exists(cfg.test_path, self.name, type(cfg), "test_path")
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    rows = _read_jsonl(cfg.test_path, builder_name=self.name,
                       config_cls=type(cfg), field="test_path",
                       required=self._FIELDS)
    for i, (line_no, row) in enumerate(rows):
      try:
        level = int(row["level"])
      except (TypeError, ValueError):
        raise ValueError(
            f"{self.name}: {cfg.test_path}:{line_no}: level must be an "
            f"integer, got {row['level']!r}.") from None
      yield i, {"id": i, "problem": row["problem"],
                "answer": str(row["answer"]), "solution": row["solution"],
                "subject": row["subject"], "level": level,
                "unique_id": row["unique_id"]}


def _check_exists(path, builder_name, config_cls, field) -> None:
  """Fails before any split is written when a JSONL file is missing."""
  if not os.path.isfile(os.fspath(path)):
    raise FileNotFoundError(
        f"{builder_name}: data file {os.fspath(path)!r} does not exist. Set "
        f"the builder config field {config_cls.__name__}.{field} to the JSONL "
        f"file (e.g. {config_cls.__name__}(name='local', "
        f"{field}='/path/to/file.jsonl')), or place the file at that path.")


# --------------------------------------------------------------- helpers --

_BUILDERS = {
    "rlax_arithmetic": RlaxArithmetic,
    "rlax_countdown": RlaxCountdown,
    "rlax_gsm8k": RlaxGsm8k,
    "rlax_math500": RlaxMath500,
}


def prepare(name: str, *, data_dir: str | os.PathLike,
            config: str | tfds.core.BuilderConfig | None = None
            ) -> tfds.core.DatasetBuilder:
  """Prepares a builder into ``data_dir`` as ArrayRecord (once) and returns it.

  Args:
    name: One of ``rlax_arithmetic``, ``rlax_countdown``, ``rlax_gsm8k``,
      ``rlax_math500``.
    data_dir: Directory that holds prepared datasets; created if needed.
    config: A predefined config name (default ``"default"``) or a config
      object of the builder's config class.

  Returns:
    The prepared builder; ``builder.as_data_source(split)`` reads it.

  Raises:
    ValueError: On an unknown builder name or a config of the wrong class.
    FileNotFoundError: When a JSONL builder's file is missing.
  """
  if name not in _BUILDERS:
    raise ValueError(
        f"Unknown dataset {name!r}; the builders of this module are "
        f"{sorted(_BUILDERS)}.")
  cls = _BUILDERS[name]
  if isinstance(config, tfds.core.BuilderConfig):
    expected = type(cls.BUILDER_CONFIGS[0])
    if not isinstance(config, expected):
      raise ValueError(
          f"{name} takes a {expected.__name__}, got "
          f"{type(config).__name__}.")
  builder = cls(config=config, data_dir=os.fspath(data_dir),
                file_format=_FILE_FORMAT)
  builder.download_and_prepare(file_format=_FILE_FORMAT)
  return builder


def load_source(name: str, split: str, *, data_dir: str | os.PathLike,
                config: str | tfds.core.BuilderConfig | None = None) -> Any:
  """Prepares (if needed) and returns one split as a random-access source.

  Args:
    name: A builder name (see ``prepare``).
    split: A split of that builder (``"train"`` or ``"test"``; MATH-500 has
      only ``"test"``).
    data_dir: Directory that holds prepared datasets.
    config: As in ``prepare``.

  Returns:
    A TFDS ``ArrayRecordDataSource``: ``len(source)`` records,
    ``source[i]`` a dict of NumPy values (text as ``bytes``).

  Raises:
    ValueError: On an unknown builder, config or split name.
  """
  builder = prepare(name, data_dir=data_dir, config=config)
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(
        f"{name} has no split {split!r}; choose one of {splits}.")
  return builder.as_data_source(split=split)
