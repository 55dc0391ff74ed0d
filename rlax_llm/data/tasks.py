"""Task setups: problems, tokenizer, prompt budget and reward of each task.

A setup (built by `rlax_llm.experiment.setups.make_setup` from a config)
offers what the experiment layer and the rollout engines use:

  tokenizer         encode/decode/encode_batch/decode_batch, pad_id, eos_id
  task              `train_batch(step, B, draw=0)` -> B problems with `.prompt`
                    and `.answer` (the reference the reward reads)
  prompt_len        width prompts are padded to
  max_new_tokens    completion budget
  reward_fn         (texts, answers) -> reward_N, in this process
  reward_item_fn    picklable fn(completion, **kwargs) -> float, for the
                    process-isolated `RewardRunner`, with `reward_kwargs(answer)`
  eval_set(split, n) held-out problems of a split

and, for tasks whose train stream has a position (`state_dict()` /
`load_state_dict()`), a JSON-able state saved with every checkpoint, plus
per-step `data/...` metrics (`step_metrics()`).

Tasks:
  arithmetic  synthetic "a<op>b=" problems, character tokenizer (in-process
              reward by default: it is fast).
  countdown   reach a target from 3-4 numbers with + - * /, character
              tokenizer (its alphabet adds "/"); SFT targets are solutions.
  gsm8k       grade-school math word problems from local JSONL, read through
              the TFDS builder and a grain loader; Hugging Face tokenizer.
  reasoning   the chain-of-thought corpus of `rlax_llm.data.reasoning`
              (chain sums, Countdown search, sorting), character tokenizer or
              the base model's (`model.hf_path`).
  math500     MATH-500 from local JSONL (one split: "test", also the train
              stream unless `task.train_split` says otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from rlax_llm import data as data_lib
from rlax_llm.data import reasoning as reasoning_lib
from rlax_llm.rewards import arithmetic as arith_rewards
from rlax_llm.rewards import countdown as countdown_rewards
from rlax_llm.rewards import reasoning as reasoning_rewards

# The shipped data: <repository>/../shared/data.
DEFAULT_SOURCE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))), "shared", "data")


class Example(NamedTuple):
  """One problem of a task.

  Attributes:
    prompt: the text the policy continues.
    answer: the reference the reward reads.
    target: the SFT completion (without EOS).
    index: the record's position in its split (-1 for generated problems).
  """
  prompt: str
  answer: str
  target: str
  index: int = -1


# -- arithmetic -----------------------------------------------------------------
class ArithmeticSetup:
  """Task, tokenizer and reward of the synthetic arithmetic experiment."""

  use_runner = False  # in-process scoring unless the config asks for workers

  def __init__(self, task_cfg: Any, seed: int):
    self.tokenizer = data_lib.CharTokenizer()
    self.task = data_lib.ArithmeticTask(
        min_digits=task_cfg.min_digits, max_digits=task_cfg.max_digits,
        ops=tuple(task_cfg.ops), mul_max_digits=task_cfg.mul_max_digits,
        test_fraction=task_cfg.test_fraction, seed=seed)
    self.prompt_len = self.task.max_prompt_length
    self.max_new_tokens = (task_cfg.max_new_tokens
                           or self.task.max_answer_length + 1)

  def reward_fn(self, texts: Sequence[str], answers: Sequence[str]):
    return arith_rewards.batch_verify(texts, answers)

  reward_item_fn = staticmethod(arith_rewards.verify)

  @staticmethod
  def reward_kwargs(answer: str) -> dict[str, Any]:
    return {"answer": answer}

  def eval_set(self, split: str, n: int):
    _check_split(split, ("test",), "arithmetic")
    return self.task.test_set(n)


# -- countdown ------------------------------------------------------------------
def countdown_reference(numbers: Sequence[int], target: int) -> str:
  """The reference string of a Countdown problem: "25 3 7 50 -> 228"."""
  return " ".join(str(int(n)) for n in numbers) + f" -> {int(target)}"


def parse_countdown_reference(answer: str) -> dict[str, Any]:
  """{"numbers": [...], "target": t} of a `countdown_reference` string."""
  head, sep, tail = str(answer).partition("->")
  if not sep:
    raise ValueError(f"Not a Countdown reference (\"n1 n2 ... -> target\"): "
                     f"{answer!r}.")
  return {"numbers": [int(v) for v in head.split()], "target": int(tail)}


class _CountdownProblems:
  """`CountdownTask` whose problems carry a reference and a solution."""

  def __init__(self, task: data_lib.CountdownTask):
    self.generator = task

  @staticmethod
  def _wrap(p) -> Example:
    return Example(p.prompt, countdown_reference(p.numbers, p.target),
                   p.solution)

  def train_batch(self, step: int, batch_size: int, *, draw: int = 0):
    return [self._wrap(p) for p in self.generator.train_batch(
        step, batch_size, draw=draw)]

  def test_set(self, n: int):
    return [self._wrap(p) for p in self.generator.test_set(n)]


class CountdownSetup:
  """Countdown (numbers + target -> an equation), character tokenizer.

  Config fields (`config.task`): num_numbers_min/max, min_number, max_number,
  min_target, max_target, test_fraction, max_new_tokens (0 = the longest
  solution + EOS), max_prompt_len (0 = the longest prompt).
  """

  use_runner = True

  def __init__(self, task_cfg: Any, seed: int):
    self.tokenizer = data_lib.CharTokenizer(data_lib.DEFAULT_ALPHABET + "/")
    gen = data_lib.CountdownTask(
        num_numbers=(task_cfg.num_numbers_min, task_cfg.num_numbers_max),
        min_number=task_cfg.min_number, max_number=task_cfg.max_number,
        min_target=task_cfg.min_target, max_target=task_cfg.max_target,
        test_fraction=task_cfg.test_fraction, seed=seed)
    self.task = _CountdownProblems(gen)
    self.prompt_len = task_cfg.max_prompt_len or gen.max_prompt_length
    n = task_cfg.num_numbers_max
    # n numbers, n - 1 operators and a parenthesis pair per inner node.
    longest = n * len(str(task_cfg.max_number)) + (n - 1) + 2 * (n - 2)
    self.max_new_tokens = task_cfg.max_new_tokens or longest + 1

  def reward_fn(self, texts: Sequence[str], answers: Sequence[str]):
    refs = [parse_countdown_reference(a) for a in answers]
    return countdown_rewards.batch_verify(
        texts, [r["numbers"] for r in refs], [r["target"] for r in refs])

  reward_item_fn = staticmethod(countdown_rewards.verify)
  reward_kwargs = staticmethod(parse_countdown_reference)

  def eval_set(self, split: str, n: int):
    _check_split(split, ("test",), "countdown")
    return self.task.test_set(n)


# -- the reasoning corpus ----------------------------------------------------------
_REASONING_FIELDS = tuple(f.name for f in dataclasses.fields(
    reasoning_lib.ReasoningConfig))


class ReasoningSetup:
  """The reasoning corpus (`rlax_llm.data.reasoning`): chain-of-thought
  completions that end in "answer X".

  Config fields (`config.task`): those of `ReasoningConfig` (families as
  "chain=1,search=1,sort=1", operand counts, ...), max_prompt_len (0 = 28,
  the longest prompt of the default settings), max_new_tokens (0 = 256).
  The tokenizer is the checkpoint's (`config.model.hf_path`, e.g. a base
  model written by `experiments.pretrain`) when one is set, else the
  character tokenizer over `reasoning.ALPHABET`. Eval splits: "test", "ood"
  (more chain operands than training uses), "chain", "search", "sort".
  """

  use_runner = False  # the verifier is fast and never executes model text

  def __init__(self, config: Any, workdir: str):
    del workdir
    t = config.task
    fields = {k: t[k] for k in _REASONING_FIELDS if k in t}
    self.task = reasoning_lib.ReasoningTask(
        reasoning_lib.ReasoningConfig(**fields), config.seed)
    hf_path = config.model.get("hf_path", "")
    if hf_path:
      from rlax_llm.models.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
      self.tokenizer = HFTokenizer.from_pretrained(hf_path)
      missing = [ch for ch in reasoning_lib.ALPHABET
                 if len(self.tokenizer.encode(ch)) != 1]
      if missing:
        raise ValueError(
            f"The tokenizer of config.model.hf_path={hf_path!r} does not map "
            f"every character of the reasoning alphabet to one token (e.g. "
            f"{missing[:5]}); use a checkpoint written by experiments.pretrain.")
    else:
      self.tokenizer = data_lib.CharTokenizer(reasoning_lib.ALPHABET)
    self.prompt_len = int(t.get("max_prompt_len", 0) or 28)
    self.max_new_tokens = int(t.get("max_new_tokens", 0) or 256)

  def reward_fn(self, texts: Sequence[str], answers: Sequence[str]):
    return reasoning_rewards.batch_verify(texts, answers)

  @staticmethod
  def reward_item_fn(completion, answer):
    return reasoning_rewards.verify(completion, answer)

  @staticmethod
  def reward_kwargs(answer: str) -> dict[str, Any]:
    return {"answer": answer}

  def eval_set(self, split: str, n: int):
    return self.task.eval_set(split, n)


# -- JSONL datasets through TFDS + grain ------------------------------------------
class _Renderer:
  """Record -> prompt text: a format string, optionally in a chat template."""

  def __init__(self, template: str, tokenizer, chat: bool, system: str):
    self.template, self.tokenizer = template, tokenizer
    self.chat, self.system = chat, system

  def __call__(self, record: dict[str, Any]) -> str:
    text = self.template.format_map(record)
    if not self.chat:
      return text
    messages = ([{"role": "system", "content": self.system}]
                if self.system else [])
    messages.append({"role": "user", "content": text})
    return self.tokenizer.apply_chat_template(messages,
                                              add_generation_prompt=True)


class _Stream:
  """A resumable train stream: `train_batch` reads the next B records.

  Records are read in the grain loader's seeded shuffled order (reshuffled
  each epoch). Calls consume the stream in order, whatever `step` and `draw`
  they name, so a run is deterministic given the stream's state, which is
  saved with each checkpoint (`state_dict`).
  """

  def __init__(self, setup: "JsonlSetup"):
    self.setup = setup
    self.read: list[int] = []  # record indices read since the last metrics

  def train_batch(self, step: int, batch_size: int, *, draw: int = 0):
    del step, draw  # the position is the loader's state
    out = []
    for _ in range(batch_size):
      row = next(self.setup.loader)
      idx = int(row["index"][0])
      self.read.append(idx)
      out.append(Example(row["prompt_text"][0], row["answer"][0],
                         row["solution"][0] if "solution" in row else
                         row["answer"][0], idx))
    return out


_DATASETS = {
    # name: builder, splits, template, answer style, question field, files
    "gsm8k": dict(
        builder="rlax_gsm8k", splits=("train", "test"),
        template=("{question}\nSolve it step by step and give the final "
                  "answer after \"####\"."),
        style="gsm8k", files={"train_path": "gsm8k/train.jsonl",
                              "test_path": "gsm8k/test.jsonl"}),
    "math500": dict(
        builder="rlax_math500", splits=("test",),
        template=("{problem}\nPlease reason step by step, and put your final "
                  "answer within \\boxed{{}}."),
        style="math", files={"test_path": "math500/test.jsonl"}),
}


def _file_digest(paths: Sequence[str]) -> str:
  h = hashlib.sha1()
  for p in paths:
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    h.update(b"\0")
  return h.hexdigest()[:12]


class JsonlSetup:
  """GSM8K or MATH-500 from local JSONL, Hugging Face tokenizer.

  Config fields (`config.task`): source_dir (JSONL root; "" = ../shared/data
  beside the repository), data_dir (prepared TFDS data; "" = <workdir>/tfds),
  tokenizer_path ("" = `config.model.hf_path`), chat_template, system_prompt,
  prompt_template ("" = the dataset's), max_prompt_len (longer prompts are
  skipped and counted), max_new_tokens, train_split, reward_style ("" = the
  dataset's).
  """

  use_runner = True

  def __init__(self, name: str, config: Any,
               workdir: str):
    from rlax_llm.data import pipeline  # pylint: disable=g-import-not-at-top
    from rlax_llm.data import tfds_builders  # pylint: disable=g-import-not-at-top
    from rlax_llm.models.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    t = config.task
    spec = _DATASETS[name]
    self.name = name
    tok_path = t.tokenizer_path or config.model.get("hf_path", "")
    if not tok_path:
      raise ValueError(
          f"Task {name!r} needs a Hugging Face tokenizer: set "
          "--config.task.tokenizer_path=DIR (a directory with tokenizer.json) "
          "or --config.model.hf_path=DIR.")
    self.tokenizer = HFTokenizer.from_pretrained(tok_path)
    if t.chat_template and self.tokenizer.chat_template is None:
      raise ValueError(
          f"config.task.chat_template is on but {tok_path!r} has no chat "
          "template; set --config.task.chat_template=False or add "
          "chat_template to its tokenizer_config.json.")
    source_dir = os.path.abspath(t.source_dir or DEFAULT_SOURCE_DIR)
    files = {}
    for field, rel in spec["files"].items():
      path = os.path.join(source_dir, rel)
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Data file {path!r} of task {name!r} does not exist. Set "
            "--config.task.source_dir to the directory holding "
            f"{rel} (now {source_dir!r}).")
      files[field] = path
    cls = (tfds_builders.Gsm8kBuilderConfig if name == "gsm8k"
           else tfds_builders.Math500BuilderConfig)
    # Named after the files' contents, so other files never reuse stale data.
    builder_cfg = cls(name="src" + _file_digest(list(files.values())),
                      **files)
    data_dir = t.data_dir or os.path.join(workdir, "tfds")
    self._sources = {
        s: tfds_builders.load_source(spec["builder"], s, data_dir=data_dir,
                                     config=builder_cfg)
        for s in spec["splits"]}
    self.splits = spec["splits"]
    # The math verifier loads sympy: imported by the tasks that score with it.
    from rlax_llm.rewards import math as math_rewards  # pylint: disable=g-import-not-at-top
    self.style = t.reward_style or spec["style"]
    if self.style not in math_rewards.STYLES:
      raise ValueError(f"config.task.reward_style={self.style!r}; choose one "
                       f"of {math_rewards.STYLES}.")
    self.render = _Renderer(t.prompt_template or spec["template"],
                            self.tokenizer, bool(t.chat_template),
                            t.system_prompt)
    self.prompt_len = int(t.max_prompt_len)
    self.max_new_tokens = int(t.max_new_tokens)
    if self.prompt_len < 1 or self.max_new_tokens < 1:
      raise ValueError(f"Task {name!r} needs config.task.max_prompt_len and "
                       "config.task.max_new_tokens >= 1.")
    _check_split(t.train_split, self.splits, name, "task.train_split")
    extra = ("solution",)
    self.loader = pipeline.make_loader(
        self._sources[t.train_split], tokenizer=self.tokenizer,
        template=self.render, batch_size=1, max_prompt_len=self.prompt_len,
        seed=int(config.seed) % 2**32, shuffle=True, num_epochs=None,
        shard_index=0, shard_count=1, worker_count=0, extra_keys=extra)
    self.task = _Stream(self)
    self.reward_item_fn = functools.partial(math_rewards.verify,
                                            style=self.style)

  def reward_fn(self, texts: Sequence[str], answers: Sequence[str]):
    from rlax_llm.rewards import math as math_rewards  # pylint: disable=g-import-not-at-top
    return math_rewards.batch_verify(texts, answers, style=self.style)

  @staticmethod
  def reward_kwargs(answer: str) -> dict[str, Any]:
    return {"answer": answer}

  def eval_set(self, split: str, n: int):
    """The first n records of `split` whose prompt fits (in file order)."""
    from rlax_llm.data.pipeline import decode_record  # pylint: disable=g-import-not-at-top
    _check_split(split, self.splits, self.name)
    source = self._sources[split]
    out, skipped = [], 0
    for i in range(len(source)):
      if len(out) >= n:
        break
      rec = decode_record(source[i])
      text = self.render(rec)
      if len(self.tokenizer.encode(text)) > self.prompt_len:
        skipped += 1
        continue
      out.append(Example(text, rec["answer"], rec.get("solution", ""), i))
    if not out:
      raise ValueError(
          f"No {self.name} {split} prompt fits in task.max_prompt_len="
          f"{self.prompt_len} tokens; raise it.")
    self.eval_skipped = skipped
    return out

  # -- the stream's position, saved with each checkpoint --
  def state_dict(self) -> dict[str, Any]:
    return self.loader.state()

  def load_state_dict(self, state) -> None:
    if state is not None:
      self.loader.restore(state)

  def step_metrics(self) -> dict[str, float]:
    """data/... counters and a checksum of the records read since last call."""
    read = np.asarray(self.task.read, np.int64)
    self.task.read = []
    out = self.loader.metrics()
    out["data/records"] = float(len(read))
    out["data/index_crc"] = float(zlib.crc32(read.tobytes()))
    return out


def _check_split(split: str, splits: Sequence[str], task: str,
                 field: str = "eval.split") -> None:
  if split not in splits:
    raise ValueError(f"Task {task!r} has no split {split!r} (config.{field}); "
                     f"choose one of {list(splits)}.")


def sft_target(problem) -> str:
  """The SFT completion of a problem (its answer when it has no target)."""
  return getattr(problem, "target", None) or problem.answer
