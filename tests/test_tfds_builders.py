"""Tests for rlax_llm.data.tfds_builders: every record round-trips."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlax_llm.data import tfds_builders as tb
from rlax_llm.data.arithmetic import ArithmeticTask
from rlax_llm.data.countdown import CountdownTask

_GSM8K = tb.DEFAULT_DATA_ROOT / "gsm8k"
_MATH500 = tb.DEFAULT_DATA_ROOT / "math500" / "test.jsonl"


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _text(value):
  assert isinstance(value, bytes), type(value)
  return value.decode("utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


# ------------------------------------------------------------ synthetic --


def test_arithmetic_round_trip(data_dir):
  cfg = tb.ArithmeticBuilderConfig(name="small", max_digits=2, seed=3,
                                   train_size=1500, test_size=200)
  train = tb.load_source("rlax_arithmetic", "train", data_dir=data_dir,
                         config=cfg)
  test = tb.load_source("rlax_arithmetic", "test", data_dir=data_dir,
                        config=cfg)
  task = ArithmeticTask(max_digits=2, seed=3)
  # Two chunks of draws, the second cut (1500 = 1024 + 476).
  want_train = task.train_batch(0, 1024) + task.train_batch(1, 1024)[:476]
  want_test = task.test_set(200)
  assert len(train) == 1500 and len(test) == 200
  for source, want in ((train, want_train), (test, want_test)):
    got = [source[i] for i in range(len(source))]
    assert [int(r["id"]) for r in got] == list(range(len(want)))
    assert [(_text(r["prompt"]), _text(r["answer"])) for r in got] == [
        (p.prompt, p.answer) for p in want]
  # The prepared data lies under the caller's data_dir.
  assert (data_dir / "rlax_arithmetic" / "small" / "1.0.0").is_dir()
  assert any("array_record" in f.name for f in
             (data_dir / "rlax_arithmetic" / "small" / "1.0.0").iterdir())


def test_countdown_round_trip(data_dir):
  cfg = tb.CountdownBuilderConfig(name="small", seed=5, max_number=50,
                                  train_size=300, test_size=100)
  builder = tb.prepare("rlax_countdown", data_dir=data_dir, config=cfg)
  task = CountdownTask(max_number=50, seed=5)
  expected = {"train": task.train_batch(0, 1024)[:300],
              "test": task.test_set(100)}
  for split, want in expected.items():
    source = builder.as_data_source(split=split)
    assert len(source) == len(want)
    for i, p in enumerate(want):
      r = source[i]
      assert int(r["id"]) == i
      assert _text(r["prompt"]) == p.prompt
      assert _text(r["answer"]) == p.answer
      assert _text(r["solution"]) == p.solution
      assert int(r["target"]) == p.target
      assert r["numbers"].dtype == np.int64
      assert tuple(r["numbers"].tolist()) == p.numbers
  # Splits are disjoint as stored.
  keys = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split=split)
    keys[split] = {(tuple(sorted(source[i]["numbers"].tolist())),
                    int(source[i]["target"])) for i in range(len(source))}
  assert not keys["train"] & keys["test"]


def test_preparing_twice_reuses_the_files(data_dir):
  cfg = tb.ArithmeticBuilderConfig(name="tiny", train_size=10, test_size=5)
  first = tb.load_source("rlax_arithmetic", "test", data_dir=data_dir,
                         config=cfg)
  path = data_dir / "rlax_arithmetic" / "tiny" / "1.0.0"
  stamp = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
  second = tb.load_source("rlax_arithmetic", "test", data_dir=data_dir,
                          config=cfg)
  assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == stamp
  assert [second[i]["prompt"] for i in range(5)] == [
      first[i]["prompt"] for i in range(5)]


# ------------------------------------------------------------ JSONL sets --


@pytest.fixture(scope="module")
def gsm8k_builder(data_dir):
  if not (_GSM8K / "test.jsonl").exists():
    pytest.skip(f"GSM8K files not found under {_GSM8K}")
  return tb.prepare("rlax_gsm8k", data_dir=data_dir)


def test_gsm8k_round_trip_all_rows(gsm8k_builder):
  for split, size in (("test", 1319), ("train", 7473)):
    rows = _jsonl(_GSM8K / f"{split}.jsonl")
    source = gsm8k_builder.as_data_source(split=split)
    assert len(rows) == len(source) == size
    if split == "train":  # Spot-check the larger split; test checks all.
      picks = range(0, size, 97)
    else:
      picks = range(size)
    for i in picks:
      r, row = source[i], rows[i]
      assert int(r["id"]) == i
      assert _text(r["question"]) == row["question"]
      assert _text(r["solution"]) == row["answer"]
      assert _text(r["answer"]) == row["answer"].split("####")[-1].strip()
  # Hand case: the first test problem (Janet's ducks) answers 18.
  assert _text(gsm8k_builder.as_data_source(split="test")[0]["answer"]) == "18"


def test_gsm8k_reads_through_tfds_data_source(gsm8k_builder, data_dir):
  del gsm8k_builder  # Prepared already.
  source = tfds.data_source("rlax_gsm8k", split="test", data_dir=data_dir,
                            download=False)
  rows = _jsonl(_GSM8K / "test.jsonl")
  assert len(source) == 1319
  assert _text(source[1318]["question"]) == rows[1318]["question"]


def test_math500_round_trip_all_rows(data_dir):
  if not _MATH500.exists():
    pytest.skip(f"MATH-500 file not found at {_MATH500}")
  source = tb.load_source("rlax_math500", "test", data_dir=data_dir)
  rows = _jsonl(_MATH500)
  assert len(rows) == len(source) == 500
  for i, row in enumerate(rows):
    r = source[i]
    assert int(r["id"]) == i
    for key in ("problem", "solution", "answer", "subject", "unique_id"):
      assert _text(r[key]) == str(row[key]), (i, key)
    assert int(r["level"]) == int(row["level"])


def test_gsm8k_custom_config_paths(tmp_path, data_dir):
  lines = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
           {"question": "Big?", "answer": "So 1,000.\n####  1,000 "}]
  path = tmp_path / "mini.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  cfg = tb.Gsm8kBuilderConfig(name="mini", train_path=str(path),
                              test_path=str(path))
  source = tb.load_source("rlax_gsm8k", "train", data_dir=data_dir,
                          config=cfg)
  assert [_text(source[i]["answer"]) for i in range(2)] == ["5", "1,000"]


# ------------------------------------------------------------ errors --


def test_missing_jsonl_names_path_and_field(tmp_path):
  missing = tmp_path / "nowhere" / "test.jsonl"
  cfg = tb.Math500BuilderConfig(name="missing", test_path=str(missing))
  with pytest.raises(FileNotFoundError) as e:
    tb.prepare("rlax_math500", data_dir=tmp_path, config=cfg)
  assert str(missing) in str(e.value)
  assert "Math500BuilderConfig.test_path" in str(e.value)
  cfg = tb.Gsm8kBuilderConfig(name="missing", train_path=str(missing))
  with pytest.raises(FileNotFoundError, match="Gsm8kBuilderConfig.train_path"):
    tb.prepare("rlax_gsm8k", data_dir=tmp_path, config=cfg)


def test_bad_rows_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "a\n#### 1"}) + "\n"
                  + json.dumps({"question": "q", "answer": "no marker"}))
  cfg = tb.Gsm8kBuilderConfig(name="bad", train_path=str(path),
                              test_path=str(path))
  with pytest.raises(ValueError, match=rf"{path}:2.*####"):
    tb.prepare("rlax_gsm8k", data_dir=tmp_path / "d1", config=cfg)
  path.write_text(json.dumps({"question": "q"}) + "\n")
  cfg = tb.Gsm8kBuilderConfig(name="bad2", train_path=str(path),
                              test_path=str(path))
  with pytest.raises(ValueError, match=r"bad.jsonl:1 lacks field\(s\) \['answer'\]"):
    tb.prepare("rlax_gsm8k", data_dir=tmp_path / "d2", config=cfg)
  assert tb.gsm8k_final_answer("x\n#### 42 ") == "42"
  with pytest.raises(ValueError, match="####"):
    tb.gsm8k_final_answer("42")


def test_bad_names_and_sizes(tmp_path, data_dir):
  with pytest.raises(ValueError, match="Unknown dataset 'gsm9k'"):
    tb.prepare("gsm9k", data_dir=tmp_path)
  cfg = tb.ArithmeticBuilderConfig(name="tiny", train_size=10, test_size=5)
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', "
                     r"'train'\]"):
    tb.load_source("rlax_arithmetic", "validation", data_dir=data_dir,
                   config=cfg)
  with pytest.raises(ValueError, match="takes a CountdownBuilderConfig"):
    tb.prepare("rlax_countdown", data_dir=tmp_path, config=cfg)
  bad = tb.CountdownBuilderConfig(name="empty", train_size=0)
  with pytest.raises(ValueError, match="train_size must be a positive int"):
    tb.prepare("rlax_countdown", data_dir=tmp_path, config=bad)
  assert not os.path.exists(tmp_path / "rlax_countdown" / "empty" / "1.0.0")
