"""Task setups in the experiment loop: countdown, gsm8k, resumable streams,
process-isolated rewards that hang or raise.

The misbehaving reward is in tests/broken_rewards.py, a module with light
imports: each reward worker, and each replacement of one killed after a
timeout, imports its function's module when it starts.
"""

import functools
import json
import os
import zlib

import numpy as np
import pytest

from configs import countdown as countdown_config
from configs import gsm8k as gsm8k_config
from configs import smoke
from rlax_llm.data import CountdownTask
from rlax_llm import experiment
from rlax_llm.data import tasks
from rlax_llm.training.metrics import read_metrics
from tests import broken_rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(REPO, "..", "shared", "data", "gsm8k")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def write_tokenizer(path, texts, vocab_size=400):
  """A byte-level BPE tokenizer trained on `texts`, saved as an HF dir."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": CHAT_TEMPLATE}, f)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                tok.token_to_id("<|endoftext|>")],
               "pad_token_id": tok.token_to_id("<|endoftext|>")}, f)
  return path


def short_gsm8k(path, num_train=24, num_test=6):
  """The shortest GSM8K questions of the shipped files, as a JSONL root."""
  os.makedirs(os.path.join(path, "gsm8k"), exist_ok=True)
  texts = []
  for split, n in (("train", num_train), ("test", num_test)):
    with open(os.path.join(GSM8K, f"{split}.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    rows = sorted(rows, key=lambda r: len(r["question"]))[:n]
    with open(os.path.join(path, "gsm8k", f"{split}.jsonl"), "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    texts += [r["question"] + "\n" + r["answer"] for r in rows]
  return path, texts


def _shrunk(module):
  c = module.get_config()
  s = smoke.get_config()
  for section in ("eval", "checkpoint"):
    c[section] = s[section]
  c.sft.steps, c.sft.batch_size = 2, 4
  for key in ("steps", "prompts_per_step", "num_samples"):
    c.rl[key] = s.rl[key]
  c.progress = False
  return c


def _strip_time(records):
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in records]


# -- countdown -------------------------------------------------------------------
def test_countdown_setup_scores_solutions_and_its_prompts_fit(tmp_path):
  del tmp_path
  c = countdown_config.get_config()
  setup = tasks.CountdownSetup(c.task, seed=3)
  problems = setup.task.train_batch(5, 64)
  ref = CountdownTask(seed=3).train_batch(5, 64)
  assert [p.prompt for p in problems] == [p.prompt for p in ref]
  # The SFT target is a solution: Python's own arithmetic reaches the target.
  for p, q in zip(problems, ref):
    assert p.target == q.solution
    assert abs(eval(p.target) - q.target) < 1e-9  # pylint: disable=eval-used
    assert tasks.parse_countdown_reference(p.answer) == {
        "numbers": list(q.numbers), "target": q.target}
    assert len(p.target) + 1 <= setup.max_new_tokens
  wrong = [p.target + "+1" for p in problems]
  np.testing.assert_array_equal(
      setup.reward_fn([p.target for p in problems] + wrong,
                      [p.answer for p in problems] * 2),
      [1.0] * 64 + [0.0] * 64)
  ids, _ = setup.tokenizer.encode_batch([p.prompt for p in problems],
                                        max_length=setup.prompt_len)
  assert setup.tokenizer.decode_batch(ids)[0] == problems[0].prompt


def test_unknown_task_is_named(tmp_path):
  c = smoke.get_config()
  c.task.name = "countdwn"
  with pytest.raises(ValueError, match="Unknown task 'countdwn'.*countdown"):
    experiment.Experiment(c, str(tmp_path))


def test_hanging_and_raising_rewards_never_stop_training(tmp_path):
  c = _shrunk(countdown_config)
  c.eval.num_problems, c.eval.num_samples = 4, 0
  c.reward.timeout_s = 0.5
  b, g, s0 = c.rl.prompts_per_step, c.rl.num_samples, c.sft.steps
  gen = CountdownTask(num_numbers=(3, 4), seed=c.seed)
  batches = [gen.train_batch(s0 + i, b) for i in range(c.rl.steps)]
  hang, fail = {batches[0][0].target}, {batches[1][2].target}
  exp = experiment.Experiment(c, str(tmp_path))
  exp.setup.reward_item_fn = functools.partial(
      broken_rewards.countdown_reward_that_hangs_or_raises,
      hang=frozenset(hang),
      fail=frozenset(fail) - frozenset(hang))
  exp.run()
  assert exp._runner is None  # closed at the end  # pylint: disable=protected-access
  rl = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
        if "rl/loss" in r]
  assert len(rl) == c.rl.steps
  for r, batch in zip(rl, batches):
    targets = [p.target for p in batch]
    assert r["reward/timeouts"] == g * sum(t in hang for t in targets)
    assert r["reward/errors"] == g * sum(t in fail and t not in hang
                                         for t in targets)
    assert np.isfinite(r["rl/loss"])
  assert rl[0]["reward/timeouts"] >= g and rl[1]["reward/errors"] >= g


# -- gsm8k: a tokenizer trained here, a tiny model, a resumable stream -------------
@pytest.fixture(scope="module")
def gsm8k_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("gsm8k")
  source, texts = short_gsm8k(str(root / "src"))
  tok = write_tokenizer(str(root / "tok"), texts)
  return source, tok, str(root / "tfds")


def _gsm8k_config(dirs):
  source, tok, data_dir = dirs
  c = _shrunk(gsm8k_config)
  c.task.update(source_dir=source, tokenizer_path=tok, data_dir=data_dir,
                chat_template=True, max_prompt_len=96, max_new_tokens=6)
  c.model = smoke.get_config().model
  c.model.max_seq_len = 102
  c.rl.learning_rate = 1e-3
  c.rl.dynamic_sampling = True   # extra draws read the stream too
  c.rl.max_sampling_rounds = 2
  c.eval.num_problems = 4
  c.checkpoint.every = 100
  return c


def test_gsm8k_resumed_run_reads_the_records_of_an_uninterrupted_one(
    gsm8k_dirs, tmp_path):
  c = _gsm8k_config(gsm8k_dirs)
  c.reward.mode = "inline"  # worker rewards are tested elsewhere
  full = tmp_path / "full"
  experiment.run(c, str(full))
  part = tmp_path / "part"
  c_short = _gsm8k_config(gsm8k_dirs)
  c_short.reward.mode = "inline"
  c_short.rl.steps = 2
  experiment.run(c_short, str(part))
  experiment.run(c, str(part))  # resumes at step sft + 2
  want = _strip_time(read_metrics(str(full / "metrics.jsonl")))
  got = _strip_time(read_metrics(str(part / "metrics.jsonl")))
  assert got == want
  steps = [r for r in want if "data/records" in r]
  assert len(steps) == c.sft.steps + c.rl.steps
  # SFT reads its batch; each RL step one or two draws of B prompts.
  b = c.rl.prompts_per_step
  assert [r["data/records"] for r in steps[:c.sft.steps]] == [
      c.sft.batch_size] * c.sft.steps
  assert all(r["data/records"] in (b, 2 * b) for r in steps[c.sft.steps:])
  # An independent loader with the run's seed reads the same records.
  from rlax_llm.data import pipeline  # pylint: disable=g-import-not-at-top
  from rlax_llm.models.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
  setup = experiment.make_setup(c, str(tmp_path / "ref"))
  source = setup._sources["train"]  # pylint: disable=protected-access
  tok = HFTokenizer.from_pretrained(c.task.tokenizer_path)
  loader = pipeline.make_loader(
      source, tokenizer=tok, template=setup.render, batch_size=1,
      max_prompt_len=c.task.max_prompt_len, seed=c.seed, shard_index=0,
      shard_count=1)
  for r in steps:
    idx = np.array([int(next(loader)["index"][0])
                    for _ in range(int(r["data/records"]))], np.int64)
    assert r["data/index_crc"] == zlib.crc32(idx.tobytes())
  assert steps[-1]["data/examples_read"] == loader.stats()["examples_read"]
  rl = [r for r in want if "rl/loss" in r]
  assert all(np.isfinite(r["rl/loss"]) and r["reward/timeouts"] == 0
             for r in rl)


def test_gsm8k_evaluate_scores_train_and_test(gsm8k_dirs, tmp_path):
  c = _gsm8k_config(gsm8k_dirs)
  c.rl.steps = 1
  summary = experiment.run(c, str(tmp_path))
  total = c.sft.steps + c.rl.steps
  for split in ("test", "train"):
    result = experiment.evaluate_checkpoint(c, str(tmp_path), split=split)
    assert result["step"] == total
    assert result["split"] == split and result["num_problems"] == 4
    for key in ("accuracy", "pass@1", "pass@4", "maj@4"):
      assert 0.0 <= result[key] <= 1.0
    if split == "test":  # the run's final evaluation, reproduced
      for key in ("accuracy", "pass@1", "pass@4", "maj@4"):
        assert result[key] == summary["final_eval"][key]
  saved = json.load(open(tmp_path / f"eval_train_step{total}.json"))
  assert saved["split"] == "train"
  with pytest.raises(ValueError, match="no split 'validation'"):
    experiment.evaluate_checkpoint(c, str(tmp_path), split="validation")


def test_missing_gsm8k_file_names_the_path_and_the_field(gsm8k_dirs,
                                                         tmp_path):
  c = _gsm8k_config(gsm8k_dirs)
  c.task.source_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError,
                     match=r"nowhere/gsm8k/train\.jsonl.*task\.source_dir"):
    experiment.Experiment(c, str(tmp_path / "w"))
  c = _gsm8k_config(gsm8k_dirs)
  c.task.tokenizer_path = ""
  with pytest.raises(ValueError, match="task.tokenizer_path"):
    experiment.Experiment(c, str(tmp_path / "w"))


def test_gsm8k_prompt_longer_than_the_context_is_refused(gsm8k_dirs,
                                                         tmp_path):
  c = _gsm8k_config(gsm8k_dirs)
  c.model.max_seq_len = 64  # 96 prompt + 6 completion tokens do not fit
  with pytest.raises(ValueError, match="exceeds the model context"):
    experiment.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()
