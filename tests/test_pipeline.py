"""Tests for rlax_llm.data.pipeline: order, resume, shards, filter, buckets."""

import json

import numpy as np
import pytest

from rlax_llm.data import tfds_builders as tb
from rlax_llm.data.pipeline import decode_record
from rlax_llm.data.pipeline import make_loader
from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.data.tokenizer import DEFAULT_ALPHABET

_TOK = CharTokenizer()
_N = 60


def _source(n=_N, seed=0):
  """Records whose prompts have 1..20 characters, text stored as bytes."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefgh"))
  out = []
  for i in range(n):
    length = int(rng.integers(1, 21))
    out.append({"prompt": "".join(rng.choice(letters, length)).encode(),
                "answer": str(i).encode(), "k": np.int64(i)})
  return out


def _loader(source, **kw):
  args = dict(tokenizer=_TOK, template="{prompt}", batch_size=4,
              max_prompt_len=24, seed=0, shard_index=0, shard_count=1)
  args.update(kw)
  return make_loader(source, **args)


def _indices(loader, batches=None):
  out = []
  for b, batch in enumerate(loader):
    if batches is not None and b == batches:
      break
    out.extend(batch["index"].tolist())
  return out


def _same_batch(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], np.ndarray):
      assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
    else:
      assert a[key] == b[key]


# ------------------------------------------------------------ order --


def test_unshuffled_reads_in_record_order_and_epochs_repeat():
  source = _source()
  got = _indices(_loader(source, shuffle=False, num_epochs=2,
                         drop_remainder=False))
  assert got == list(range(_N)) * 2


def test_same_seed_same_order_other_seed_other_order():
  source = _source()
  a = _indices(_loader(source, seed=1, num_epochs=3))
  b = _indices(_loader(source, seed=1, num_epochs=3))
  c = _indices(_loader(source, seed=2, num_epochs=3))
  assert a == b
  assert a != c
  # Every epoch is a permutation, and epochs are shuffled differently.
  epochs = [a[e * _N:(e + 1) * _N] for e in range(3)]
  for order in epochs + [c[:_N]]:
    assert sorted(order) == list(range(_N))
  assert epochs[0] != epochs[1] != epochs[2]
  assert epochs[0] != list(range(_N))


# ------------------------------------------------------------ resume --


@pytest.mark.parametrize("k", [0, 3, 17])
def test_resumed_loader_reads_what_uninterrupted_one_reads(k):
  # 60 records, 4 per batch: 25 batches cross two epoch boundaries; a short
  # max_prompt_len makes the filter drop records on the way.
  source = _source()
  kw = dict(seed=7, max_prompt_len=14, buckets=(8, 14))
  reference = _loader(source, **kw)
  expected = [next(reference) for _ in range(25)]
  first = _loader(source, **kw)
  for _ in range(k):
    next(first)
  saved = json.loads(json.dumps(first.state()))  # Through a checkpoint.
  resumed = _loader(source, **kw)
  resumed.restore(saved)
  for want in expected[k:]:
    _same_batch(next(resumed), want)
  assert resumed.stats() == reference.stats()
  assert reference.stats()["dropped_too_long"] > 0


def test_resume_of_a_finite_run_and_its_end():
  source = _source()
  kw = dict(seed=3, num_epochs=1, drop_remainder=False, batch_size=7)
  full = _indices(_loader(source, **kw))
  first = _loader(source, **kw)
  head = [i for _ in range(5) for i in next(first)["index"].tolist()]
  resumed = _loader(source, **kw)
  resumed.restore(first.state())
  tail = _indices(resumed)
  assert head == full[:35]
  assert tail == full[35:]  # 25 more: 3 full batches and one of 4.
  assert len(full) == _N and sorted(full) == list(range(_N))
  assert resumed.stats()["batches"] == 9
  with pytest.raises(StopIteration):
    next(resumed)


def test_restore_rejects_another_configuration():
  source = _source()
  saved = _loader(source, seed=1).state()
  with pytest.raises(ValueError, match="same source, seed"):
    _loader(source, seed=2).restore(saved)
  with pytest.raises(ValueError, match="PromptLoader.state"):
    _loader(source).restore({"grain": {}})


# ------------------------------------------------------------ shards --


@pytest.mark.parametrize("n", [60, 61])
def test_shards_are_disjoint_and_cover_the_data(n):
  source = _source(n)
  kw = dict(seed=5, num_epochs=1, batch_size=1)
  shards = [_indices(_loader(source, shard_index=i, shard_count=2, **kw))
            for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert len(shards[0]) == len(shards[1]) == n // 2
  assert len(set(shards[0] + shards[1])) == 2 * (n // 2)
  if n % 2 == 0:
    assert sorted(shards[0] + shards[1]) == list(range(n))
  # Each shard holds a contiguous block of records, shuffled inside.
  assert sorted(shards[0]) == list(range(n // 2))
  assert shards[0] != sorted(shards[0])


def test_default_shard_is_the_jax_process():
  loader = make_loader(_source(), tokenizer=_TOK, batch_size=4,
                       max_prompt_len=24)
  assert (loader.shard_index, loader.shard_count) == (0, 1)
  assert loader.records_per_epoch == _N


# ------------------------------------------------------------ filter --


def test_length_filter_counts_match_reference():
  source = _source()
  max_len = 9
  lengths = [len(_TOK.encode(r["prompt"].decode())) for r in source]
  keep = [i for i, n in enumerate(lengths) if n <= max_len]
  loader = _loader(source, shuffle=False, num_epochs=1, max_prompt_len=max_len,
                   batch_size=5, drop_remainder=False)
  got = _indices(loader)
  assert got == keep
  stats = loader.stats()
  assert stats["dropped_too_long"] == _N - len(keep) > 0
  assert stats["examples_read"] == _N
  assert stats["examples_kept"] == len(keep)
  assert stats["batches"] == -(-len(keep) // 5)
  metrics = loader.metrics()
  assert metrics["data/dropped_too_long_frac"] == pytest.approx(
      (_N - len(keep)) / _N)
  assert metrics["data/epoch"] == pytest.approx(1.0)


def test_drop_remainder_counts_the_rows_left_over():
  source = _source()
  loader = _loader(source, num_epochs=1, batch_size=8)
  assert len(_indices(loader)) == 56
  stats = loader.stats()
  assert stats["dropped_remainder"] == 4
  assert (stats["examples_kept"] + stats["dropped_too_long"]
          + stats["dropped_remainder"]) == stats["examples_read"] == _N


def test_all_too_long_raises_instead_of_spinning():
  loader = _loader(_source(), max_prompt_len=1, buckets=None)
  with pytest.raises(ValueError, match="raise max_prompt_len"):
    next(loader)


# ------------------------------------------------------------ padding --


def test_bucketing_and_left_padding_against_reference():
  source = _source()
  buckets = (6, 12, 20)
  loader = _loader(source, seed=4, num_epochs=1, max_prompt_len=20,
                   buckets=buckets, batch_size=3)
  shapes = set()
  for batch in loader:
    texts = [source[i]["prompt"].decode() for i in batch["index"]]
    longest = max(len(t) for t in texts)
    want = min(b for b in buckets if b >= longest)
    assert batch["prompt"].shape == (3, want)
    assert batch["prompt"].dtype == np.int32
    shapes.add(want)
    for row, (ids, mask, text) in enumerate(zip(batch["prompt"],
                                                batch["prompt_mask"], texts)):
      n = len(text)
      assert batch["prompt_len"][row] == n
      assert mask.tolist() == [False] * (want - n) + [True] * n
      assert ids[:want - n].tolist() == [_TOK.pad_id] * (want - n)
      assert _TOK.decode(ids[mask]) == text
      assert batch["prompt_text"][row] == text
    assert batch["answer"] == [str(i) for i in batch["index"]]
  assert shapes == {6, 12, 20}  # Every bucket occurs with this data.
  fixed = _loader(source, max_prompt_len=20)
  assert next(fixed)["prompt"].shape == (4, 20)
  assert loader.bucket_length(1) == 6 and loader.bucket_length(13) == 20


def test_templates_string_and_callable_agree():
  source = _source()
  as_string = _loader(source, template="q: {prompt} = {k}?",
                      max_prompt_len=40)

  def render(record):
    return f"q: {record['prompt']} = {record['k']}?"

  as_callable = _loader(source, template=render, max_prompt_len=40)
  a, b = next(as_string), next(as_callable)
  _same_batch(a, b)
  i = int(a["index"][0])
  assert a["prompt_text"][0] == f"q: {source[i]['prompt'].decode()} = {i}?"


def test_extra_keys_from_a_tfds_source(tmp_path):
  cfg = tb.CountdownBuilderConfig(name="tiny", train_size=40, test_size=10)
  source = tb.load_source("rlax_countdown", "train", data_dir=tmp_path,
                          config=cfg)
  tok = CharTokenizer(DEFAULT_ALPHABET + "/")  # Countdown prompts show '/'.
  kw = dict(tokenizer=tok, batch_size=4, max_prompt_len=80, seed=0,
            shard_index=0, shard_count=1, extra_keys=("numbers", "target"))
  loader = make_loader(source, **kw)
  batch = next(loader)
  for row, i in enumerate(batch["index"]):
    record = decode_record(source[int(i)])
    assert batch["numbers"][row] == record["numbers"]
    assert all(isinstance(v, int) for v in batch["numbers"][row])
    assert batch["target"][row] == record["target"]
    assert batch["answer"][row] == str(record["target"])
  # Resume over the TFDS source too.
  saved = loader.state()
  want = next(loader)
  again = make_loader(source, **kw)
  again.restore(saved)
  _same_batch(next(again), want)


def test_decode_record():
  rec = decode_record({"a": b"x\xc3\xa9", "b": np.int64(3),
                       "c": np.array([1, 2]), "d": np.array([b"u", b"v"]),
                       "e": 1.5})
  assert rec == {"a": "x\u00e9", "b": 3, "c": [1, 2], "d": ["u", "v"],
                 "e": 1.5}
  assert type(rec["b"]) is int


# ------------------------------------------------------------ errors --


@pytest.mark.parametrize("kw, err, match", [
    (dict(buckets=(8, 16)), ValueError, "largest bucket 16"),
    (dict(shard_index=2, shard_count=2), ValueError, "shard_index=2"),
    (dict(shard_index=0, shard_count=None), ValueError, "both shard_index"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(seed=2**32), ValueError, "seed"),
    (dict(template="{question}"), KeyError, "names field 'question'"),
    (dict(answer_key="label"), KeyError, "no field 'label'"),
    (dict(tokenizer=object()), TypeError, "encode"),
])
def test_bad_arguments(kw, err, match):
  with pytest.raises(err, match=match):
    _loader(_source(), **kw)
