"""A grain input pipeline from a random-access source to padded prompt batches.

``make_loader`` turns any random-access source of dict records (a
``tfds.data_source`` split, ``rlax_llm.data.tfds_builders.load_source``, or a
plain list of dicts) into an iterator of prompt batches:

  1. **Sampling** (grain ``IndexSampler``): a seeded shuffle, reshuffled every
     epoch, for ``num_epochs`` epochs (forever when None). The same seed gives
     the same order; another seed another order.
  2. **Sharding**: process ``shard_index`` of ``shard_count`` (by default
     ``jax.process_index()`` of ``jax.process_count()``) reads its own
     contiguous ``floor(N / shard_count)`` records of every epoch; shards are
     disjoint, and the last ``N mod shard_count`` records are left out (none
     with one shard).
  3. **Rendering and tokenisation** (a grain ``Map``, run in the grain
     workers when ``worker_count > 0``): text fields are decoded from UTF-8,
     the prompt is ``template.format_map(record)`` for a format string such as
     ``"{question}\\nAnswer:"``, or ``template(record)`` for a callable (a chat
     template plugs in this way), and encoded with ``tokenizer.encode(text,
     add_eos=False)``.
  4. **Length filtering**, in the calling process: prompts longer than
     ``max_prompt_len`` tokens are dropped and counted (``stats()``,
     ``metrics()``); nothing is dropped silently.
  5. **Batching and padding**: ``batch_size`` prompts are left padded with
     ``tokenizer.pad_id`` to a fixed length: ``max_prompt_len``, or with
     ``buckets`` the smallest bucket length that holds the batch's longest
     prompt, so that only ``len(buckets)`` shapes reach the compiler.

Each batch is a dict of NumPy values (``B = batch_size``, ``P`` the padded
length)::

  prompt        int32 [B, P]  token ids, left padded with pad_id
  prompt_mask   bool  [B, P]  True on real tokens
  prompt_len    int32 [B]     number of real tokens
  index         int64 [B]     record index in the source (its position)
  answer        list[str]     the reference answer (field ``answer_key``)
  prompt_text   list[str]     the rendered prompt
  <extra key>   list          each field of ``extra_keys`` (``numbers`` ...)

Resuming. ``loader.state()`` is a JSON-able dict (grain's ``DataLoader``
iterator state plus the loader's counters); save it with each checkpoint.
A loader built with the same arguments and given that dict with
``restore(state)`` yields exactly the batches the saved loader would have
yielded next, and its counters continue where they stopped. Examples are
pulled from grain one at a time and only as batches need them, so the state
always points at the next unseen example.

Multi-host. Every process builds its own loader (with its own shard) and
yields ``batch_size`` rows, its part of the global batch. With ``buckets``,
processes may pick different lengths for the same step; pad to the longest
across processes (or leave ``buckets`` unset) before assembling a global
array.

Parallelism. With ``worker_count > 0`` grain renders and tokenises in child
processes, so the tokenizer and a callable template must be picklable
(module-level functions, not lambdas). Examples cross processes one at a
time, so workers pay off only when rendering or tokenising is costly; 0 is
the faster choice for cheap tokenizers. A state saved with one
``worker_count`` restores only into a loader with the same value.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

__all__ = ["PromptLoader", "decode_record", "make_loader"]

_STATE_VERSION = 1
_COUNTERS = ("examples_read", "examples_kept", "dropped_too_long",
             "dropped_remainder", "batches")


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """Decodes a TFDS-style record into plain Python values.

  ``bytes`` become ``str`` (UTF-8), NumPy scalars Python scalars and NumPy
  arrays lists (arrays of bytes become lists of str).

  Args:
    record: A mapping of field name to value.

  Returns:
    A new dict with the decoded values.
  """
  return {k: _decode_value(v) for k, v in record.items()}


def _decode_value(value):
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray):
    if value.dtype.kind in "SO":
      return [_decode_value(v) for v in value.tolist()]
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


class _IndexedSource:
  """Wraps a source so that each record carries its index.

  Its ``repr`` names the wrapped source without the data or memory
  addresses, since grain compares it when a saved state is restored.
  """

  def __init__(self, source):
    self._source = source
    self._len = len(source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    return int(index), self._source[index]

  def __repr__(self) -> str:
    source = self._source
    if isinstance(source, (list, tuple, np.ndarray)):
      name = type(source).__name__
    else:
      name = repr(source)
      if " at 0x" in name:  # Default object repr: differs per process.
        name = type(source).__name__
    return f"IndexedSource({name}, len={self._len})"


@dataclasses.dataclass(frozen=True)
class _Render(grain.transforms.Map):
  """Decodes, renders and tokenises one ``(index, record)`` pair."""

  tokenizer: Any
  template: str | Callable[[dict[str, Any]], str]
  answer_key: str
  extra_keys: tuple[str, ...]

  def map(self, element):
    index, record = element
    record = decode_record(record)
    text = _render(self.template, record, index)
    ids = np.asarray(self.tokenizer.encode(text, add_eos=False),
                     dtype=np.int32)
    out = {"index": index, "ids": ids, "text": text}
    for key in (self.answer_key,) + self.extra_keys:
      if key not in record:
        raise KeyError(
            f"Record {index} has no field {key!r} (asked for by "
            f"{'answer_key' if key == self.answer_key else 'extra_keys'}); "
            f"its fields are {sorted(record)}.")
      out[key] = record[key]
    out[self.answer_key] = str(out[self.answer_key])
    return out


def _render(template, record: dict[str, Any], index: int) -> str:
  if callable(template):
    text = template(record)
    if not isinstance(text, str):
      raise TypeError(
          f"The template callable must return a str, got "
          f"{type(text).__name__} for record {index}.")
    return text
  try:
    return template.format_map(record)
  except KeyError as e:
    raise KeyError(
        f"Prompt template {template!r} names field {e.args[0]!r}, which "
        f"record {index} lacks; its fields are {sorted(record)}. Fix the "
        "template or pass a callable template.") from None


class PromptLoader:
  """Iterator of padded prompt batches with a resumable state.

  Built by ``make_loader``; see the module docstring for the batch format.

  Attributes:
    batch_size: Rows per batch (this process's part of the global batch).
    max_prompt_len: Longest prompt kept, in tokens.
    buckets: Ascending padded lengths to choose from.
    shard_index: This process's shard.
    shard_count: Number of shards.
    records_per_epoch: Records this shard reads per epoch.
  """

  def __init__(self, source, *, tokenizer, template, batch_size: int,
               max_prompt_len: int, buckets: Sequence[int] | None, seed: int,
               shuffle: bool, num_epochs: int | None, shard_index: int | None,
               shard_count: int | None, worker_count: int, answer_key: str,
               extra_keys: Sequence[str], drop_remainder: bool,
               read_threads: int):
    """See ``make_loader``."""
    _check_int("batch_size", batch_size, 1)
    _check_int("max_prompt_len", max_prompt_len, 1)
    _check_int("worker_count", worker_count, 0)
    _check_int("read_threads", read_threads, 0)
    _check_int("seed", seed, 0)
    if seed >= 2**32:
      raise ValueError(
          f"seed must be below 2**32 (grain's shuffle seed), got {seed}.")
    if num_epochs is not None:
      _check_int("num_epochs", num_epochs, 1)
    for name in ("encode", "pad_id"):
      if not hasattr(tokenizer, name):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} lacks {name!r}; it needs "
            "encode(text, add_eos=False) -> list[int] and pad_id (e.g. "
            "rlax_llm.data.tokenizer.CharTokenizer).")
    if not (isinstance(template, str) or callable(template)):
      raise TypeError(
          "template must be a format string such as '{question}\\nAnswer:' "
          f"or a callable record -> str, got {type(template).__name__}.")
    if buckets is None:
      buckets = (max_prompt_len,)
    else:
      buckets = tuple(sorted({int(b) for b in buckets}))
      if not buckets or buckets[0] < 1:
        raise ValueError(
            f"buckets must be positive lengths, got {buckets!r}.")
      if buckets[-1] < max_prompt_len:
        raise ValueError(
            f"The largest bucket {buckets[-1]} is shorter than max_prompt_len"
            f"={max_prompt_len}, so a kept prompt might not fit; add "
            f"{max_prompt_len} to buckets or lower max_prompt_len.")
    if shard_index is None or shard_count is None:
      if (shard_index is None) != (shard_count is None):
        raise ValueError(
            "Pass both shard_index and shard_count, or neither (to shard by "
            "jax.process_index() / jax.process_count()).")
      import jax  # pylint: disable=g-import-not-at-top
      shard_index, shard_count = jax.process_index(), jax.process_count()
    _check_int("shard_count", shard_count, 1)
    _check_int("shard_index", shard_index, 0)
    if shard_index >= shard_count:
      raise ValueError(
          f"shard_index={shard_index} must be below shard_count="
          f"{shard_count}.")
    num_records = len(source)
    if num_records < shard_count:
      raise ValueError(
          f"The source holds {num_records} records, fewer than shard_count="
          f"{shard_count}; every shard needs at least one.")

    self.batch_size = int(batch_size)
    self.max_prompt_len = int(max_prompt_len)
    self.buckets = buckets
    self.shard_index = int(shard_index)
    self.shard_count = int(shard_count)
    self.records_per_epoch = num_records // self.shard_count
    self._pad_id = int(tokenizer.pad_id)
    self._answer_key = answer_key
    self._extra_keys = tuple(extra_keys)
    self._drop_remainder = bool(drop_remainder)
    if worker_count > 0 and not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside an absl app (a
      # notebook, a test) they were never parsed, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    render = _Render(tokenizer, template, answer_key, self._extra_keys)
    # Fail at construction, not in a worker, on a template or field error.
    render.map((0, source[0]))

    shard_options = grain.sharding.ShardOptions(
        shard_index=self.shard_index, shard_count=self.shard_count,
        drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=num_records, shard_options=shard_options,
        shuffle=bool(shuffle), num_epochs=num_epochs,
        seed=int(seed))
    self._loader = grain.DataLoader(
        data_source=_IndexedSource(source), sampler=sampler,
        operations=[render], worker_count=int(worker_count),
        shard_options=shard_options,
        read_options=grain.ReadOptions(
            num_threads=int(read_threads),
            prefetch_buffer_size=max(4 * self.batch_size, 16)))
    self._iter = iter(self._loader)
    self._counters = dict.fromkeys(_COUNTERS, 0)
    self._exhausted = False

  # ------------------------------------------------------------ iteration --

  def __iter__(self) -> PromptLoader:
    return self

  def __next__(self) -> dict[str, Any]:
    counters = self._counters
    rows = []
    misses = 0  # Dropped in a row; a whole epoch of them means none fit.
    while len(rows) < self.batch_size:
      if self._exhausted:
        break
      try:
        example = next(self._iter)
      except StopIteration:
        self._exhausted = True
        break
      counters["examples_read"] += 1
      length = len(example["ids"])
      if length > self.max_prompt_len:
        counters["dropped_too_long"] += 1
        if counters["dropped_too_long"] == 1:
          logging.warning(
              "Dropping prompts longer than max_prompt_len=%d tokens (the "
              "first: record %d, %d tokens); see PromptLoader.stats().",
              self.max_prompt_len, example["index"], length)
        misses += 1
        if misses >= self.records_per_epoch:
          raise ValueError(
              f"{misses} prompts in a row (a whole epoch of this shard) are "
              f"longer than max_prompt_len={self.max_prompt_len} tokens; "
              "raise max_prompt_len or shorten the template.")
        continue
      misses = 0
      rows.append(example)
    if not rows or (len(rows) < self.batch_size and self._drop_remainder):
      counters["dropped_remainder"] += len(rows)
      raise StopIteration
    counters["examples_kept"] += len(rows)
    counters["batches"] += 1
    return self._collate(rows)

  def _collate(self, rows) -> dict[str, Any]:
    lengths = np.array([len(r["ids"]) for r in rows], dtype=np.int32)
    width = self.bucket_length(int(lengths.max()))
    prompt = np.full((len(rows), width), self._pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
      n = len(r["ids"])
      if n:
        prompt[i, width - n:] = r["ids"]
        mask[i, width - n:] = True
    batch = {
        "prompt": prompt,
        "prompt_mask": mask,
        "prompt_len": lengths,
        "index": np.array([r["index"] for r in rows], dtype=np.int64),
        "answer": [r[self._answer_key] for r in rows],
        "prompt_text": [r["text"] for r in rows],
    }
    for key in self._extra_keys:
      batch[key] = [r[key] for r in rows]
    return batch

  def bucket_length(self, longest: int) -> int:
    """The padded length of a batch whose longest prompt has ``longest`` tokens.

    Args:
      longest: Tokens of the longest prompt, at most ``max_prompt_len``.

    Returns:
      The smallest bucket ``>= longest``.
    """
    for bucket in self.buckets:
      if bucket >= longest:
        return bucket
    raise ValueError(
        f"No bucket holds {longest} tokens; buckets are {self.buckets}.")

  # ------------------------------------------------------ state and stats --

  def state(self) -> dict[str, Any]:
    """The JSON-able position of the loader, to save with a checkpoint.

    Returns:
      ``{"version", "grain", "counters", "exhausted"}``: grain's iterator
      state (a dict), the counters of ``stats()``, and whether a finite run
      has ended.
    """
    return {
        "version": _STATE_VERSION,
        "grain": json.loads(self._iter.get_state().decode()),
        "counters": dict(self._counters),
        "exhausted": self._exhausted,
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a ``state()`` taken on a loader with the same arguments.

    Args:
      state: A dict returned by ``state()`` (possibly through JSON).

    Raises:
      ValueError: If ``state`` is malformed or was saved by a loader over
        another source, sampler (seed, shuffle, epochs, shards) or
        ``worker_count``.
    """
    if (not isinstance(state, Mapping) or state.get("version")
        != _STATE_VERSION or not {"grain", "counters"} <= set(state)):
      raise ValueError(
          "PromptLoader.restore expects a dict from PromptLoader.state() "
          f"(version {_STATE_VERSION}), got {str(state)[:200]!r}.")
    try:
      self._iter.set_state(json.dumps(state["grain"]).encode())
    except (ValueError, KeyError) as e:
      raise ValueError(
          "The saved loader state does not fit this loader; build it with "
          "the same source, seed, shuffle, num_epochs, shard_index, "
          f"shard_count and worker_count as the saved run. Grain says: {e}"
      ) from e
    self._counters = {k: int(state["counters"].get(k, 0)) for k in _COUNTERS}
    self._exhausted = bool(state.get("exhausted", False))

  def stats(self) -> dict[str, int]:
    """Counters since the start of the run (restored ones included).

    Returns:
      ``examples_read`` (taken from grain), ``examples_kept`` (emitted in
      batches), ``dropped_too_long`` (longer than ``max_prompt_len``),
      ``dropped_remainder`` (left in an incomplete last batch) and
      ``batches``. ``examples_read == examples_kept + dropped_too_long +
      dropped_remainder`` once a batch has been completed.
    """
    return dict(self._counters)

  def metrics(self) -> dict[str, float]:
    """``stats()`` as ``data/...`` metrics, with a drop rate and the epoch.

    Returns:
      The counters under ``data/<name>``, ``data/dropped_too_long_frac``
      (of examples read) and ``data/epoch`` (records read over
      ``records_per_epoch``).
    """
    c = self._counters
    out = {f"data/{k}": float(v) for k, v in c.items()}
    out["data/dropped_too_long_frac"] = (
        c["dropped_too_long"] / max(c["examples_read"], 1))
    out["data/epoch"] = c["examples_read"] / self.records_per_epoch
    return out


def make_loader(
    source,
    *,
    tokenizer,
    template: str | Callable[[dict[str, Any]], str] = "{prompt}",
    batch_size: int,
    max_prompt_len: int,
    buckets: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    answer_key: str = "answer",
    extra_keys: Sequence[str] = (),
    drop_remainder: bool = True,
    read_threads: int = 2,
) -> PromptLoader:
  """Builds a ``PromptLoader`` over a random-access source.

  Example::

    source = tfds_builders.load_source("rlax_gsm8k", "train", data_dir=d)
    loader = make_loader(source, tokenizer=tok, batch_size=8,
                         template="{question}\\nAnswer:", max_prompt_len=256,
                         buckets=(64, 128, 256), seed=0)
    batch = next(loader)           # batch["prompt"]: int32 [8, 64|128|256]
    saved = loader.state()         # JSON-able; restore() resumes from it

  Args:
    source: Random-access records: ``len(source)`` and ``source[i]`` -> dict
      (text as ``str`` or UTF-8 ``bytes``).
    tokenizer: Has ``encode(text, add_eos=False) -> list[int]`` and
      ``pad_id``.
    template: Format string over the record's fields, or a callable
      ``render(record) -> str`` taking the decoded record.
    batch_size: Rows per batch, B.
    max_prompt_len: Prompts with more tokens are dropped (and counted).
    buckets: Padded lengths to choose from (each batch takes the smallest
      that fits); the largest must be >= ``max_prompt_len``. None pads every
      batch to ``max_prompt_len``.
    seed: Shuffle seed, in ``[0, 2**32)``.
    shuffle: Whether to shuffle (each epoch differently); False reads in
      record order.
    num_epochs: Passes over the data; None repeats forever.
    shard_index: This process's shard; None (with ``shard_count``) uses
      ``jax.process_index()``.
    shard_count: Number of shards; None uses ``jax.process_count()``.
    worker_count: grain worker processes for rendering and tokenising; 0
      works in this process.
    answer_key: Record field that holds the reference answer.
    extra_keys: Further record fields passed through to the batch as lists.
    drop_remainder: Whether to drop an incomplete last batch (finite
      ``num_epochs`` only); its rows are counted as ``dropped_remainder``.
    read_threads: Threads reading records from the source.

  Returns:
    The loader, positioned at the first batch.

  Raises:
    ValueError: On invalid sizes, shards, buckets or seed.
    TypeError: On a tokenizer without ``encode``/``pad_id`` or a bad template.
    KeyError: If the template, ``answer_key`` or ``extra_keys`` name a field
      the first record lacks.
  """
  return PromptLoader(
      source, tokenizer=tokenizer, template=template, batch_size=batch_size,
      max_prompt_len=max_prompt_len, buckets=buckets, seed=seed,
      shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
      shard_count=shard_count, worker_count=worker_count,
      answer_key=answer_key, extra_keys=extra_keys,
      drop_remainder=drop_remainder, read_threads=read_threads)


def _check_int(name: str, value, minimum: int) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise ValueError(
        f"{name} must be an int >= {minimum}, got {value!r}.")
