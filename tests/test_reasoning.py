"""The reasoning corpus, its verifier, the character tokenizer's HF export,
SFT batch padding, and a base model written by `experiments.pretrain` that an
RL config loads by `model.hf_path`."""

import itertools
import json
import os

import numpy as np
import pytest

from rlax_llm.data import reasoning
from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.rewards import reasoning as rr


# -- verifier ---------------------------------------------------------------------
@pytest.mark.parametrize("completion,reference,want", [
    (" 1+2=3. answer 3", "chain|3", 1.0),
    (" 1+2=4. answer 4", "chain|3", 0.0),
    (" answer -30.", "chain|-30", 1.0),
    (" answer 3 and more", "chain|3", 0.0),
    ("no final answer here", "chain|3", 0.0),
    (" answer 3. answer 5", "chain|3", 0.0),  # the last answer counts
    (" answer 1 3 5 9", "sort|1 3 5 9", 1.0),
    (" answer 1 3  5 9", "sort|1 3 5 9", 0.0),  # spacing is part of it
    (" answer 1 3 9 5", "sort|1 3 5 9", 0.0),
    (" 8-5=3, 3*8=24 yes. answer (8-5)*8", "search|5 8 8|24", 1.0),
    (" answer 8*3", "search|5 8 8|24", 0.0),        # 3 is not given
    (" answer (8-5)*8=24", "search|5 8 8|24", 0.0),  # no "=" in an answer
    (" answer 8+8+8", "search|5 8 8|24", 0.0),       # 8 used three times
    (" answer 3", "nofamily|3", 0.0),
    (None, "chain|3", 0.0),
    (b" answer 3", "chain|3", 0.0),
])
def test_verify_cases(completion, reference, want):
  assert rr.verify(completion, reference) == want


def test_batch_verify_checks_lengths():
  np.testing.assert_array_equal(
      rr.batch_verify([" answer 3", " answer 4"], ["chain|3", "chain|3"]),
      [1.0, 0.0])
  with pytest.raises(ValueError, match="one reference per completion"):
    rr.batch_verify([" answer 3"], [])


# -- the three families -----------------------------------------------------------
def test_chain_steps_are_arithmetic():
  rng = np.random.default_rng(0)
  for n in range(2, 7):
    for _ in range(50):
      ex = reasoning.chain_problem(rng, n)
      expr = ex.prompt[len("calc "):-1]
      tokens = [int(t) for t in expr.replace("-", "+-").split("+")]
      assert len(tokens) == n
      assert ex.answer == f"chain|{sum(tokens)}"
      steps = ex.target.split(". answer ")[0].strip().split(", ")
      assert len(steps) == n - 1
      acc = tokens[0]
      for step, t in zip(steps, tokens[1:]):
        lhs, rhs = step.split("=")
        want_lhs = f"{acc}+{t}" if t >= 0 else f"{acc}-{-t}"
        acc += t
        assert (lhs, int(rhs)) == (want_lhs, acc)
      assert rr.verify(ex.target, ex.answer) == 1.0


def _brute_values(nums):
  """Every value of (x op y) op z over the numbers (positive integers)."""
  out = set()
  for i, j in itertools.permutations(range(3), 2):
    k = 3 - i - j
    a, b, c = nums[i], nums[j], nums[k]
    for r in {a + b, a * b, a - b, a // b if b and a % b == 0 else 0}:
      if r <= 0:
        continue
      for s in (r + c, r * c, r - c, c - r,
                r // c if r % c == 0 else 0, c // r if c % r == 0 else 0):
        if s > 0:
          out.add(s)
  return out


def test_search_trace_is_a_correct_written_search():
  rng = np.random.default_rng(1)
  made = 0
  while made < 200:
    ex = reasoning.search_problem(rng)
    if ex is None:
      continue
    made += 1
    target = int(ex.answer.split("|")[2])
    nums = [int(v) for v in ex.answer.split("|")[1].split()]
    assert target in _brute_values(nums)
    body, answer = ex.target.split(" answer ")
    lines = [l for l in body.strip().split(".") if l.strip()]
    assert 1 <= len(lines) <= 12
    for n, line in enumerate(lines):
      first, second = line.strip().split(", ")
      f_expr, f_val = first.split("=")
      s_expr, verdict = second.split(" ")
      s_lhs, s_val = s_expr.split("=")
      # each written step is right (Python's arithmetic as the reference)
      assert eval(f_expr.replace("/", "//")) == int(f_val)  # pylint: disable=eval-used
      assert eval(s_lhs.replace("/", "//")) == int(s_val)  # pylint: disable=eval-used
      assert verdict == ("yes" if int(s_val) == target else "no")
      assert (verdict == "yes") == (n == len(lines) - 1)
      # the second step is the closest to the target of r op c
      r = int(f_val)
      used = [int(v) for v in f_expr.replace("+", " ").replace("-", " ")
              .replace("*", " ").replace("/", " ").split()]
      rest = list(nums)
      for u in used:
        rest.remove(u)
      c = rest[0]
      cands = [r + c, r * c] + ([abs(r - c)] if r != c else [])
      cands += [v for v in (r // c if r % c == 0 and c > 1 else 0,
                            c // r if c % r == 0 and r > 1 and c != r else 0)
                if v]
      assert abs(int(s_val) - target) == min(abs(v - target) for v in cands)
    assert rr.verify(ex.target, ex.answer) == 1.0


def test_sort_and_mix():
  rng = np.random.default_rng(2)
  for _ in range(50):
    ex = reasoning.sort_problem(rng)
    digits = [int(v) for v in ex.prompt[len("sort "):-1].split()]
    assert ex.target == " answer " + " ".join(map(str, sorted(digits)))
    assert rr.verify(ex.target, ex.answer) == 1.0
  assert reasoning.parse_mix("chain=3,sort") == {"chain": 0.75, "sort": 0.25}
  with pytest.raises(ValueError, match="Unknown reasoning family 'chian'"):
    reasoning.parse_mix("chian=1")
  with pytest.raises(ValueError, match="not a number"):
    reasoning.parse_mix("chain=x")
  with pytest.raises(ValueError, match="positive weight"):
    reasoning.parse_mix("chain=0")


# -- the task: stream, splits, lengths --------------------------------------------
def test_train_stream_is_pure_and_never_test():
  cfg = reasoning.ReasoningConfig(test_fraction=0.2)
  a = reasoning.ReasoningTask(cfg, seed=3)
  b = reasoning.ReasoningTask(cfg, seed=3)
  assert a.train_batch(5, 32) == b.train_batch(5, 32)
  assert a.train_batch(5, 32) != a.train_batch(5, 32, draw=1)
  assert a.train_batch(5, 32) != reasoning.ReasoningTask(cfg, 4).train_batch(
      5, 32)
  test = {e.prompt for e in a.eval_set("test", 200)}
  for step in range(20):
    for e in a.train_batch(step, 64):
      assert not a.is_test(e.prompt) and e.prompt not in test
  # the splits do not depend on the seed
  assert (a.eval_set("chain", 50)
          == reasoning.ReasoningTask(cfg, 99).eval_set("chain", 50))


def test_splits_and_families():
  cfg = reasoning.ReasoningConfig(families="chain=1,search=1",
                                  chain_max_operands=3)
  task = reasoning.ReasoningTask(cfg, 0)
  fams = {e.family for e in task.train_batch(0, 200)}
  assert fams == {"chain", "search"}
  ood = task.eval_set("ood", 40)
  for e in ood:
    n_ops = e.prompt.count("+") + e.prompt.count("-") + 1
    assert 5 <= n_ops <= 6
  for e in task.eval_set("chain", 40):
    n_ops = e.prompt.count("+") + e.prompt.count("-") + 1
    assert 2 <= n_ops <= 3
  assert [e.family for e in task.eval_set("sort", 5)] == ["sort"] * 5
  assert len({e.prompt for e in task.eval_set("test", 100)}) == 100
  with pytest.raises(ValueError, match="no split 'dev'"):
    task.eval_set("dev", 3)
  by_family = reasoning.ReasoningTask(
      reasoning.ReasoningConfig(batch_by_family=True), 0)
  for step in range(10):
    assert len({e.family for e in by_family.train_batch(step, 16)}) == 1


def test_search_lengths_are_long_tailed():
  task = reasoning.ReasoningTask(reasoning.ReasoningConfig(), 0)
  tok = CharTokenizer(reasoning.ALPHABET)
  h = task.length_histogram(tok, n=1500)
  s = h["search"]
  assert sum(s["counts"]) == s["n"]
  assert s["max"] >= 150 and s["p95"] >= 1.8 * s["median"]
  assert s["mean"] > s["median"]  # right-skewed
  assert h["chain"]["max"] < 60 and h["sort"]["max"] < 30


# -- HF export of the character tokenizer ----------------------------------------
def test_char_tokenizer_export_round_trips(tmp_path):
  from rlax_llm.models.hf_tokenizer import HFTokenizer
  tok = CharTokenizer(reasoning.ALPHABET)
  tok.save_pretrained(str(tmp_path))
  hf_tok = HFTokenizer.from_pretrained(str(tmp_path))
  text = "reach 24 with 5 8 8: 8-5=3, 3*8=24 yes. answer (8-5)*8/1 ?,"
  assert hf_tok.encode(text) == tok.encode(text)
  assert (hf_tok.eos_id, hf_tok.pad_id, hf_tok.vocab_size) == (
      tok.eos_id, tok.pad_id, tok.vocab_size)
  assert hf_tok.decode(tok.encode(text, add_eos=True) + [5]) == text
  transformers = pytest.importorskip("transformers")
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert auto(text)["input_ids"] == tok.encode(text)
  assert auto.decode(tok.encode(text)) == text


# -- SFT batches padded to their own widths ---------------------------------------
def _reasoning_config(**task):
  from configs import pretrain_reasoning
  from configs import smoke
  c = smoke.shrink(pretrain_reasoning.get_config())
  c.task = pretrain_reasoning.task_section(**task)
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1,
                 head_dim=16, mlp_dim=64)
  c.sft.update(steps=4, batch_size=8)
  c.rl.steps = 0
  c.eval.update(num_problems=8, num_samples=0, batch_size=8)
  return c


def test_pad_multiple_keeps_tokens(tmp_path):
  from rlax_llm import experiment
  c = _reasoning_config(batch_by_family=False)
  c.sft.pad_multiple = 0
  full = experiment.Experiment(c, str(tmp_path / "a"))
  c2 = _reasoning_config(batch_by_family=False)
  c2.sft.pad_multiple = 32
  trimmed = experiment.Experiment(c2, str(tmp_path / "b"))
  problems = full.setup.task.train_batch(0, 8)
  a, b = full.encode_sft(problems), trimmed.encode_sft(problems)
  assert a.completion.shape[1] == 256 and b.completion.shape[1] % 32 == 0
  assert b.completion.shape[1] < 256
  longest = int(a.completion_mask.sum(1).max())
  assert b.completion.shape[1] == -(-longest // 32) * 32
  w = b.prompt.shape[1]
  assert w <= 28
  np.testing.assert_array_equal(a.prompt[:, -w:], b.prompt)
  assert not a.prompt_mask[:, :-w].any()
  t = b.completion.shape[1]
  np.testing.assert_array_equal(a.completion[:, :t], b.completion)
  assert not a.completion_mask[:, t:].any()
  full.close()
  trimmed.close()


def test_cosine_decay_schedule():
  import ml_collections
  import optax
  from rlax_llm.experiment import loop
  sec = ml_collections.ConfigDict(dict(
      warmup_steps=10, learning_rate=1.0, grad_clip=0.0, weight_decay=0.0,
      steps=110, lr_decay="cosine"))
  opt = loop._optimizer(sec)  # pylint: disable=protected-access
  # the update of a unit gradient under Adam is ~ -lr: read the schedule off it
  params = {"w": np.zeros(())}
  state = opt.init(params)
  lrs = []
  for _ in range(110):
    upd, state = opt.update({"w": np.ones(())}, state, params)
    lrs.append(-float(upd["w"]))
  assert lrs[9] == pytest.approx(0.9, rel=1e-3)   # warm-up, step 9 of 10
  assert lrs[10] == pytest.approx(1.0, rel=1e-3)  # the peak
  want_mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 50 / 100))
  assert lrs[60] == pytest.approx(want_mid, rel=1e-3)
  assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(
      np.pi * 99 / 100)), rel=1e-3)
  sec.lr_decay = "linear"
  with pytest.raises(ValueError, match="lr_decay='linear'"):
    loop._optimizer(sec)  # pylint: disable=protected-access
  del optax


# -- pretrain -> HF checkpoint -> RL from model.hf_path ----------------------------
def _base_config():
  c = _reasoning_config(families="chain=1,sort=1", max_new_tokens=48)
  c.model.max_seq_len = 80
  return c


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A toy base model written by experiments.pretrain: (dir, evals)."""
  from experiments import pretrain
  d = tmp_path_factory.mktemp("base")
  return d, pretrain.pretrain(_base_config(), str(d))


@pytest.mark.slow
def test_pretrain_export_then_rl_from_hf_path(tmp_path, base_model):
  from rlax_llm import experiment
  base_dir, evals = base_model
  c = _base_config()
  hf_dir = base_dir / "hf"
  for name in ("config.json", "model.safetensors", "tokenizer.json",
               "generation_config.json"):
    assert (hf_dir / name).is_file()
  assert set(evals) >= {"test", "ood", "chain", "search", "sort", "step"}
  assert evals["step"] == 4
  corpus = json.loads((base_dir / "corpus.json").read_text())
  assert set(corpus) == {"chain", "sort", "all"}
  # RL (GRPO) from the exported model: the policy starts as the export
  from configs import reasoning_grpo
  from configs import smoke
  rl = smoke.shrink(reasoning_grpo.get_config())
  rl.task.max_new_tokens = 48
  rl.model.update(hf_path=str(hf_dir), max_seq_len=80)
  rl.sft.steps = 0
  rl.rl.update(steps=2, prompts_per_step=2, num_samples=2)
  rl.eval.update(num_problems=8, num_samples=2, batch_size=8)
  exp = experiment.Experiment(rl, str(tmp_path / "rl"))
  state, _ = exp.initial_state()
  base = experiment.Experiment(c, str(base_dir))
  _, base_params = experiment.restore_policy(base)
  got = exp.policy_params(state)
  import jax
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(base_params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=0)
  exp.close()
  base.close()
  summary = experiment.run(rl, str(tmp_path / "rl2"))
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "rl2",
                                                   "metrics.jsonl"))]
  assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
  assert 0.0 <= summary["final_accuracy"] <= 1.0
  # The RL run's policy exported in turn (tokenizer copied from its base)
  # loads by hf_path with the same weights.
  out = str(tmp_path / "rl2_hf")
  assert experiment.export_checkpoint(rl, str(tmp_path / "rl2"), out) == 2
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  trained = experiment.trained_experiment(rl, str(tmp_path / "rl2"))
  _, want = experiment.restore_policy(trained)
  trained.close()
  again = rl.copy_and_resolve_references()
  again.model.hf_path = out
  exp = experiment.Experiment(again, str(tmp_path / "from_export"))
  state, _ = exp.initial_state()
  for x, y in zip(jax.tree.leaves(exp.policy_params(state)),
                  jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  exp.close()


@pytest.mark.slow
def test_repro_driver_runs_arms_and_tabulates(tmp_path, base_model):
  """Two arms x two seeds at toy size: resumable, one row per (arm, seed),
  the table's means and spreads those of the rows (NumPy as reference)."""
  from experiments.repro import common
  from experiments.repro import otr_sft
  hf_dir = str(base_model[0] / "hf")

  def small(loss):
    make = otr_sft.arm(loss, steps=2)

    def f(seed, base):
      cfg = make(seed, base)
      cfg.task.max_new_tokens = 48
      cfg.model.max_seq_len = 80
      cfg.sft.batch_size = 4
      cfg.eval.update(num_problems=4, batch_size=4)
      return cfg
    return f
  arms = {"sft": small("cross_entropy"), "otr": small("otr")}
  out = str(tmp_path / "repro")
  table = common.run_arms(arms, seeds=[0, 1], base=hf_dir,
                          out=out, splits=("test", "sort"))
  rows = json.loads(open(os.path.join(out, "table.json")).read())["rows"]
  assert [(r["arm"], r["seed"]) for r in rows] == [
      ("sft", 0), ("sft", 1), ("otr", 0), ("otr", 1)]
  for arm in ("sft", "otr"):
    vals = np.asarray([r["sort/accuracy"] for r in rows if r["arm"] == arm])
    assert table[arm]["sort/accuracy"]["mean"] == pytest.approx(vals.mean())
    assert table[arm]["sort/accuracy"]["std"] == pytest.approx(
        vals.std(ddof=1))
    assert table[arm]["sort/accuracy"]["n"] == 2
  md = open(os.path.join(out, "table.md")).read()
  assert md.startswith("| arm |") and "| otr |" in md
  # a second call trains nothing again (every run has its summary)
  logged = []
  common.run_arms(arms, seeds=[0, 1], base=hf_dir,
                  out=out, splits=("test", "sort"), log=logged.append)
  assert not logged


def test_latr_grpo_curves_by_hand():
  from experiments.repro import latr_grpo
  recs = [
      {"step": 0, "eval/accuracy": 0.40},
      {"step": 1, "reward/mean": 0.5, "reward/solved_groups": 0.25,
       "reward/failed_groups": 0.5, "rollout/distinct_per_group": 3.0},
      {"step": 2, "reward/mean": 0.5, "reward/solved_groups": 0.0,
       "reward/failed_groups": 0.25, "rollout/distinct_per_group": 5.0,
       "rollout/sampling_rounds": 3},
      {"step": 10, "eval/accuracy": 0.44},
      {"step": 20, "eval/accuracy": 0.46},
  ]
  c = latr_grpo.CURVES
  assert c["distinct_per_group"](recs) == pytest.approx(4.0)
  assert c["zero_variance_groups"](recs) == pytest.approx((0.75 + 0.25) / 2)
  assert c["sampling_rounds"](recs) == pytest.approx((1 + 3) / 2)
  assert c["mean_eval_accuracy"](recs) == pytest.approx(1.30 / 3)
  assert c["steps_to_plus5"](recs) == 20.0  # 0.46 >= 0.40 + 0.05
  assert c["steps_to_plus5"](recs[:4]) == 20.0  # never: last eval + 10
  with pytest.raises(ValueError, match="'grpo' or 'dapo'"):
    latr_grpo.arm("ppo", "latr", 2)(0, "base")


@pytest.mark.slow
def test_latr_grpo_arm_runs_dapo_on_the_tree(tmp_path, base_model):
  """The DAPO + LATR arm composes and trains from the exported base; the
  driver fills every column, its table the rows' values (one seed)."""
  from experiments.repro import common
  from experiments.repro import latr_grpo
  hf_dir = str(base_model[0] / "hf")
  make = latr_grpo.arm("dapo", "latr", steps=2)

  def small(seed, base):
    cfg = make(seed, base)
    assert cfg.rollout.name == "latr" and cfg.rl.dynamic_sampling
    assert tuple(cfg.rollout.windows) == latr_grpo.CHAIN_WINDOWS
    cfg.task.max_new_tokens = 48
    cfg.model.max_seq_len = 80
    cfg.rl.update(prompts_per_step=2, num_samples=4)
    cfg.eval.update(every=1, num_problems=4, num_samples=2, batch_size=4)
    return cfg
  out = str(tmp_path / "latr")
  table = common.run_arms({"dapo_latr": small}, seeds=[0], base=hf_dir,
                          out=out, splits=("test",),
                          metrics=("accuracy", "pass@1"),
                          curves=latr_grpo.CURVES)
  row = json.loads(open(os.path.join(out, "table.json")).read())["rows"][0]
  summary = json.loads(open(os.path.join(out, "dapo_latr", "seed0",
                                         "summary.json")).read())
  assert row["test/accuracy"] == summary["final_eval"]["accuracy"]
  for col in ("distinct_per_group", "zero_variance_groups",
              "mean_eval_accuracy", "steps_to_plus5", "sampling_rounds"):
    assert np.isfinite(row[col]), col
    assert table["dapo_latr"][col]["mean"] == pytest.approx(row[col])
  assert 1.0 <= row["distinct_per_group"] <= 4.0
  assert row["sampling_rounds"] >= 1.0


def test_kl_grpo_arms_differ_only_in_the_penalty_and_curves_by_hand():
  from experiments.repro import kl_grpo
  plain = kl_grpo.arm(False, 40)(1, "base").to_dict()
  kl = kl_grpo.arm(True, 40)(1, "base").to_dict()
  assert plain["rl"]["kl_coef"] == 0.0
  assert (kl["rl"]["kl_coef"], kl["rl"]["kl_estimator"]) == (0.04, "k3")
  kl["rl"]["kl_coef"] = plain["rl"]["kl_coef"]
  kl["rl"]["kl_estimator"] = plain["rl"]["kl_estimator"]
  assert kl == plain
  # On the written search the "grpo" arm is lr_check's lr1e-04 arm.
  from experiments.repro import lr_check
  search = {k: make(1, "base").to_dict()
            for k, make in kl_grpo.arms(40, "search").items()}
  assert search["grpo"] == lr_check.arms(40, "search")["lr1e-04"](
      1, "base").to_dict()
  assert _diff(search["grpo_kl"], search["grpo"]) == {"rl.kl_coef"}
  recs = [{"step": 0, "eval/accuracy": 0.5},
          {"step": 1, "rl/kl": 0.0, "rl/entropy": 0.6},
          {"step": 2, "rl/kl": 0.02, "rl/entropy": 0.4},
          {"step": 10, "eval/accuracy": 0.3}]
  c = kl_grpo.CURVES
  assert c["kl_final"](recs) == pytest.approx(0.02)
  assert c["kl_mean"](recs) == pytest.approx(0.01)
  assert c["entropy_mean"](recs) == pytest.approx(0.5)
  assert c["mean_eval_accuracy"](recs) == pytest.approx(0.4)
  assert np.isnan(c["kl_final"](recs[:1]))


def _diff(a, b, prefix=""):
  """The dotted keys at which two nested dicts differ."""
  out = set()
  for k in set(a) | set(b):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      out |= _diff(x, y, f"{prefix}{k}.")
    elif x != y:
      out.add(f"{prefix}{k}")
  return out


def test_grpo_variants_arms_differ_only_in_their_method():
  from experiments.repro import grpo_variants
  from experiments.repro import latr_grpo
  plain = latr_grpo.arm("grpo", "sampling", 40, family="search")(
      2, "base").to_dict()
  assert plain["task"]["families"] == "search=1"
  a = {v: grpo_variants.arm(v, 40)(2, "base").to_dict()
       for v in grpo_variants.VARIANTS}
  assert _diff(a["grpo"], plain) == {"rl.num_minibatches", "rl.aggregation"}
  assert (a["grpo"]["rl"]["num_minibatches"], a["grpo"]["rl"]["aggregation"],
          a["grpo"]["rl"]["scale_by_std"]) == (4, "seq_mean_token_mean", True)
  assert _diff(a["dr_grpo"], a["grpo"]) == {"rl.aggregation",
                                            "rl.scale_by_std"}
  assert (a["dr_grpo"]["rl"]["aggregation"],
          a["dr_grpo"]["rl"]["scale_by_std"]) == (
              "seq_mean_token_sum_norm", False)
  assert _diff(a["clip_higher"], a["grpo"]) == {"rl.clip_high"}
  assert (a["clip_higher"]["rl"]["clip_low"],
          a["clip_higher"]["rl"]["clip_high"]) == (0.2, 0.28)
  with pytest.raises(ValueError, match="dr_grpo"):
    grpo_variants.arm("ppo", 40)
  # Windows over the first and the last logged values, by hand.
  recs = [{"step": s, "rollout/length_wrong": float(s), "rl/entropy": 1.0}
          for s in range(1, 26)]
  recs[3].pop("rollout/length_wrong")  # a step without a wrong rollout
  c = grpo_variants.CURVES
  assert c["length_wrong_first"](recs) == pytest.approx(
      np.mean([1, 2, 3, 5, 6, 7, 8, 9, 10, 11]))
  assert c["length_wrong_last"](recs) == pytest.approx(np.mean(range(16, 26)))
  assert np.isnan(c["length_correct_last"](recs))
  from experiments.repro import common
  with pytest.raises(ValueError, match="exactly one"):
    common.window_mean("x")


def test_lr_check_arms_differ_only_in_the_learning_rate_and_curves_by_hand():
  from experiments.repro import latr_grpo
  from experiments.repro import lr_check
  for family in ("chain", "search"):
    plain = latr_grpo.arm("grpo", "sampling", 40, family=family)(
        0, "base").to_dict()
    a = {k: make(0, "base").to_dict()
         for k, make in lr_check.arms(40, family).items()}
    assert set(a) == {"lr1e-04", "lr3e-05", "lr1e-05", "control"}
    assert _diff(a["lr1e-04"], plain) == set()  # the reproductions' setting
    for k in ("lr3e-05", "lr1e-05", "control"):
      assert _diff(a[k], plain) == {"rl.learning_rate"}
    for k in ("lr3e-05", "lr1e-05"):
      assert a[k]["rl"]["learning_rate"] == float(k[2:])
    assert a["control"]["rl"]["learning_rate"] == 1e-9
  assert latr_grpo.family_splits("search") == (("search",), (
      "accuracy", "pass@1", "pass@4"))
  with pytest.raises(ValueError, match="family"):
    lr_check.arms(40, "sort")
  # 9 train steps: quarters of 2 (the ninth left out), by hand.
  recs = [{"step": 0, "eval/accuracy": 0.5}]
  recs += [{"step": s, "reward/mean": s / 10, "reward/solved_groups": 0.25,
            "reward/failed_groups": 0.5 if s % 2 else 0.25,
            "rl/entropy": 0.1 * s} for s in range(1, 10)]
  c = lr_check.CURVES
  assert c["train_reward_q1"](recs) == pytest.approx(0.15)
  assert c["train_reward_q4"](recs) == pytest.approx(0.75)
  assert c["groups_with_signal"](recs) == pytest.approx(
      1 - 0.25 - (5 * 0.5 + 4 * 0.25) / 9)
  assert c["entropy"](recs) == pytest.approx(0.5)
  assert np.isnan(c["train_reward_q1"](recs[:3]))

def test_rollout_methods_arms_and_token_curve():
  from experiments.repro import common
  from experiments.repro import latr_grpo
  from experiments.repro import rollout_methods
  plain = latr_grpo.arm("grpo", "sampling", 40, family="search")(
      0, "base").to_dict()
  a = {m: rollout_methods.arm(m, 40)(0, "base").to_dict()
       for m in rollout_methods.METHODS}
  assert a["grpo"] == plain
  assert {k for k in _diff(a["branch"], plain)} == {
      f"rollout.{k}" for k in a["branch"]["rollout"]} | {"rollout.name"}
  assert a["branch"]["rollout"]["name"] == "branch"
  assert (tuple(a["branch"]["rollout"]["split_points"]),
          tuple(a["branch"]["rollout"]["branching"])) == ((0, 12), (4, 2))
  assert a["xrpo"]["rollout"]["name"] == "xrpo"
  from configs import xrpo
  ref = xrpo.get_config().to_dict()
  assert a["xrpo"]["rollout"] == dict(ref["rollout"], seeding=False)
  assert {k for k in _diff(a["xrpo"], plain) if not k.startswith("rollout.")
          } <= {"rl.xrpo_lambda", "rl.xrpo_kappa_clip", "rl.xrpo_novelty"}
  for k in ("xrpo_lambda", "xrpo_kappa_clip", "xrpo_novelty"):
    assert a["xrpo"]["rl"][k] == ref["rl"][k]
  assert _diff(a["d3s"], plain) == {
      "rl.d3s_sample_keep", "rl.d3s_token_fraction", "rl.d3s_schedule_steps"}
  assert (a["d3s"]["rl"]["d3s_sample_keep"],
          a["d3s"]["rl"]["d3s_token_fraction"],
          a["d3s"]["rl"]["d3s_token_fraction_end"],
          a["d3s"]["rl"]["d3s_schedule_steps"]) == (4, 0.5, 1.0, 20)
  recs = [{"step": 0, "eval/accuracy": 0.3},
          {"step": 1, "rollout/sampled_tokens": 1000},
          {"step": 2, "rollout/sampled_tokens": 1500},
          {"step": 2, "eval/accuracy": 0.4}]
  np.testing.assert_array_equal(common.rollout_tokens(recs), [1000, 2500])
  assert rollout_methods.CURVES["rollout_ktokens"](recs) == 2.5
  assert rollout_methods.CURVES["rollout_ktokens"](recs[:1]) == 0.0


def test_repro_command_line_selects_arms():
  from experiments.repro import common
  arms = {"a": 1, "b": 2, "c": 3}
  assert common.select_arms(arms, "") == arms
  assert list(common.select_arms(arms, "c, a")) == ["c", "a"]
  with pytest.raises(ValueError, match=r"\['d'\].*\['a', 'b', 'c'\]"):
    common.select_arms(arms, "a,d")


def test_april_sync_arms_and_throughput_curves_by_hand():
  from configs import april_arith
  from experiments.repro import april_sync
  sync = april_sync.arm("sync", 30)(1, "base").to_dict()
  april = april_sync.arm("april", 30)(1, "base").to_dict()
  assert sync["task"]["families"] == "search=1"
  assert sync["eval"]["split"] == "search"
  assert sync["rollout"]["name"] == "sample"
  assert april["rollout"] == april_arith.get_config().rollout.to_dict()
  assert _diff(april, sync) <= ({f"rollout.{k}" for k in april["rollout"]}
                                | {"rl.recompute_old_logp"})
  assert april["rl"]["recompute_old_logp"]
  with pytest.raises(ValueError, match="sync"):
    april_sync.arm("async", 30)
  recs = [{"step": 0, "eval/accuracy": 0.1},
          {"step": 1, "rollout/rollouts": 128, "rollout/truncated": 0.25,
           "time/rollout_s": 4.0, "time/step_s": 8.0,
           "rollout/off_policy_tokens": 0.1},
          {"step": 2, "rollout/rollouts": 128, "rollout/truncated": 0.0,
           "time/rollout_s": 2.0, "time/step_s": 4.0,
           "rollout/off_policy_tokens": 0.3}]
  c = april_sync.CURVES
  assert c["finished_rollouts_per_s"](recs) == pytest.approx(
      (96 + 128) / 6.0)
  assert c["rollout_time_share"](recs) == pytest.approx(0.5)
  assert c["off_policy_tokens"](recs) == pytest.approx(0.2)
  plain = [{k: v for k, v in r.items() if k != "rollout/off_policy_tokens"}
           for r in recs]
  assert c["off_policy_tokens"](plain) == 0.0


def test_latr_search_arms_are_the_search_setting_with_the_tree():
  from experiments.repro import latr_grpo
  from experiments.repro import latr_search
  a = {k: f(0, "base").to_dict() for k, f in latr_search.arms(30).items()}
  assert a["sampling"] == latr_grpo.setting(0, "base", 30, "search").to_dict()
  assert a["sampling"]["task"]["families"] == "search=1"
  assert a["sampling"]["eval"]["split"] == "search"
  assert a["sampling"]["task"]["max_new_tokens"] == 256
  assert _diff(a["latr"], a["sampling"]) <= (
      {f"rollout.{k}" for k in a["latr"]["rollout"]})
  assert tuple(a["latr"]["rollout"]["windows"]) == latr_grpo.CHAIN_WINDOWS
  for r in ("sampling", "latr"):  # DAPO arms: the same rollouts, DAPO's loss
    assert a[f"dapo_{r}"] == latr_grpo.arm("dapo", r, 30, family="search")(
        0, "base").to_dict()
    assert _diff(a[f"dapo_{r}"], a[r]) == {"rl.clip_high",
                                           "rl.dynamic_sampling"}
    assert a[f"dapo_{r}"]["rl"]["aggregation"] == "token_mean"
  # The chain setting is the one the LATR / KL tables were measured with.
  chain = latr_grpo.setting(0, "base", 40).to_dict()
  assert (chain["task"]["families"], chain["model"]["max_seq_len"],
          chain["task"]["max_new_tokens"], chain["eval"]["num_samples"]) == (
              "chain=1", 112, 64, 8)
  with pytest.raises(ValueError, match="'chain' or 'search'"):
    latr_grpo.setting(0, "base", 30, "sort")



def test_brorl_continue_arms_and_curves_by_hand(tmp_path):
  from configs import brorl_arith
  from experiments.repro import brorl_continue
  from experiments.repro import latr_grpo
  a = brorl_continue.arms(20, str(tmp_path), 40)
  assert list(a) == ["plateau", "n16", "n512"]
  assert a["plateau"](1, "base").to_dict() == latr_grpo.setting(
      1, "base", 40).to_dict()
  c16, c512 = (a[k](1, "base").to_dict() for k in ("n16", "n512"))
  export = str(tmp_path / "plateau" / "seed1" / "hf")
  assert not os.path.exists(export)  # stage 1 not run: nothing exported
  ref = brorl_arith.get_config().rl
  for c, (prompts, n) in ((c16, (32, 16)), (c512, (1, 512))):
    assert c["model"]["hf_path"] == export
    assert (c["rl"]["prompts_per_step"], c["rl"]["num_samples"]) == (
        prompts, n)
    assert (c["rl"]["kl_coef"], c["rl"]["kl_estimator"],
            c["rl"]["dynamic_sampling"], c["rl"]["max_sampling_rounds"],
            c["rl"]["ref_reset_every"]) == (
                ref.kl_coef, ref.kl_estimator, True,
                ref.max_sampling_rounds, 10)
    assert c["rl"]["steps"] == 20
  assert _diff(c16, c512) == {"rl.prompts_per_step", "rl.num_samples"}
  assert list(brorl_continue.arms(20, str(tmp_path), 40, "n512")) == [
      "plateau", "n512"]
  with pytest.raises(ValueError, match="do not divide"):
    brorl_continue.continued_arm(24, 20, str(tmp_path), 40)
  recs = [{"step": 1, "rollout/rollouts": 512, "time/rollout_s": 4.0,
           "rollout/sampling_rounds": 2, "rollout/filtered_first_draw": 0.5},
          {"step": 2, "rollout/rollouts": 512, "time/rollout_s": 4.0,
           "rollout/filtered_first_draw": 0.0}]
  c = brorl_continue.CURVES
  assert c["rollouts_per_s"](recs) == pytest.approx(512 * 3 / 8.0)
  assert c["filtered_first_draw"](recs) == pytest.approx(0.25)


@pytest.mark.slow
def test_brorl_continue_trains_the_plateau_exports_and_continues(
    tmp_path, base_model):
  """Both stages at toy size through one run_arms call: the plateau run,
  its export on first use, a continued arm that starts from the export
  with the ProRL ingredients on."""
  from experiments.repro import brorl_continue
  from experiments.repro import common
  from rlax_llm.training.metrics import read_metrics
  out = str(tmp_path / "brorl")

  def small(make):
    def f(seed, base):
      cfg = make(seed, base)
      cfg.task.max_new_tokens = 48
      cfg.model.max_seq_len = 80
      cfg.rl.update(steps=2, prompts_per_step=max(
          1, cfg.rl.prompts_per_step // 16))
      cfg.eval.update(every=1, num_problems=4, num_samples=2, batch_size=4)
      return cfg
    return f
  arms = {k: small(v) for k, v in
          brorl_continue.arms(2, out, 2, "n512").items()}
  table = common.run_arms(arms, seeds=[0], base=str(base_model[0] / "hf"),
                          out=out, splits=("test",),
                          curves=brorl_continue.CURVES)
  export = os.path.join(out, "plateau", "seed0", "hf")
  assert os.path.isfile(os.path.join(export, "model.safetensors"))
  cont = os.path.join(out, "n512", "seed0")
  cfg = json.loads(open(os.path.join(cont, "config.json")).read())
  assert cfg["model"]["hf_path"] == export
  assert cfg["rl"]["num_samples"] == 512
  recs = [r for r in read_metrics(os.path.join(cont, "metrics.jsonl"))
          if "rl/kl" in r]
  assert len(recs) == 2 and all(np.isfinite(r["rl/kl"]) for r in recs)
  assert set(table) == {"plateau", "n512"}
  assert np.isfinite(table["n512"]["rollouts_per_s"]["mean"])


@pytest.mark.slow
def test_committed_base_model_scores_as_recorded(tmp_path):
  """The committed base (configs/pretrain_reasoning.BASE_MODEL) loads through
  model.hf_path and scores its recorded greedy accuracy on the sorting split
  (256 problems; a CPU's rounding may flip a near-tie or two)."""
  from configs import pretrain_reasoning
  from configs import reasoning_finetune
  from rlax_llm import experiment
  base = pretrain_reasoning.BASE_MODEL
  for name in ("config.json", "model.safetensors", "tokenizer.json",
               "base_eval.json", "corpus.json"):
    assert os.path.isfile(os.path.join(base, name)), name
  recorded = json.loads(open(os.path.join(base, "base_eval.json")).read())
  c = reasoning_finetune.get_config()
  assert c.model.hf_path == base
  c.task = pretrain_reasoning.task_section(max_new_tokens=32)  # sort <= 24
  c.model.max_seq_len = 64
  c.sft.steps = 0
  c.eval.update(split="sort", num_problems=256, num_samples=0,
                batch_size=256)
  exp = experiment.Experiment(c, str(tmp_path))
  try:
    state, _ = exp.initial_state()
    res = exp.evaluate(exp.policy_params(state), 0)
  finally:
    exp.close()
  assert res["accuracy"] == pytest.approx(recorded["sort"], abs=0.02)
  assert recorded["sort"] > 0.5  # a base with a prior, not a blank model


def test_chain_operands_arms_score_the_base_on_k_operands():
  from experiments.repro import chain_operands
  from experiments.repro import latr_grpo
  plain = latr_grpo.arm("grpo", "sampling", 1)(0, "base").to_dict()
  a = {k: make(0, "base").to_dict()
       for k, make in chain_operands.arms(40).items()}
  assert set(a) == {"operands2", "operands3", "operands4"}
  for k, c in a.items():
    n = int(k[-1])
    assert (c["task"]["chain_min_operands"], c["task"]["chain_max_operands"],
            c["rl"]["steps"], c["sft"]["steps"], c["eval"]["split"]) == (
                n, n, 0, 0, "chain")
    assert _diff(c, plain) <= {"task.chain_min_operands",
                               "task.chain_max_operands", "rl.steps",
                               "eval.split"}
