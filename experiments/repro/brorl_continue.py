"""BroRL: a GRPO run continued with N = 16 vs N = 512 rollouts per prompt.

  python -m experiments.repro.brorl_continue --out=runs/repro/brorl_continue \
      [--seeds=0,1,2] [--steps=20] [--plateau_steps=40] [--arms=n16,n512]

Claim (BroRL, arXiv:2510.01180): a run that has stopped improving under
ProRL's recipe (N = 16 rollouts per prompt) improves again when N grows to
512, at the same rollouts per step, with higher generation throughput and
fewer groups filtered out by dynamic sampling (a group of 512 rarely has
all rewards equal). Stage 1 ("plateau", per seed): `latr_grpo.py`'s GRPO
setting (chain sums of 2-4 operands, 16 prompts x 8 rows, AdamW 1e-4) for
--plateau_steps steps from the base, its final policy exported as a Hugging
Face checkpoint (OUT/plateau/seed<k>/hf). Stage 2 continues from that
export for --steps steps with ProRL's ingredients as
`configs/brorl_arith.py` has them (k3 KL 1e-3 to a reference reset to the
policy every 10 steps, DAPO dynamic sampling up to 4 draws) and 512
rollouts per step: "n16" 32 prompts x 16, "n512" 1 prompt x 512; the same
learning rate (equal batch sizes: brorl_arith's square-root rule gives a
factor 1). Columns: final greedy accuracy, pass@1 and pass@8 on "test",
the mean test accuracy over the evaluations, the share of the first draw's
groups that dynamic sampling filtered out, rollouts generated per second of
rollout time, and wall time; the "plateau" row is stage 1's end.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import brorl_arith
from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top

ROLLOUTS_PER_STEP = 512
ARMS = {"n16": 16, "n512": 512}  # arm -> rollouts per prompt
REF_RESET_EVERY = 10


def _rollouts_per_s(records):
  rl = [r for r in records if "time/rollout_s" in r]
  n = sum(r["rollout/rollouts"] * r.get("rollout/sampling_rounds", 1)
          for r in rl)
  secs = sum(r["time/rollout_s"] for r in rl)
  return float(n / secs) if secs else float("nan")


CURVES = {
    "mean_eval_accuracy": latr_grpo.CURVES["mean_eval_accuracy"],
    "filtered_first_draw": common.mean_of("rollout/filtered_first_draw"),
    "sampling_rounds": latr_grpo.CURVES["sampling_rounds"],
    "rollouts_per_s": _rollouts_per_s,
}


def plateau_arm(steps: int):
  def make(seed: int, base: str):
    return latr_grpo.setting(seed, base, steps)
  return make


def _export(plateau_dir: str, seed: int, base: str, plateau_steps: int
            ) -> str:
  """OUT/plateau/seed<k>/hf, written from the finished stage-1 run on first
  use (nothing is done while that run is missing or unfinished)."""
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(plateau_dir, f"seed{seed}")
  export = os.path.join(workdir, "hf")
  finished = os.path.isfile(os.path.join(workdir, "summary.json"))
  if finished and not os.path.isfile(os.path.join(export,
                                                  "model.safetensors")):
    experiment.export_checkpoint(plateau_arm(plateau_steps)(seed, base),
                                 workdir, export)
  return export


def continued_arm(n: int, steps: int, plateau_dir: str, plateau_steps: int):
  """Stage 2 with `n` rollouts per prompt, from the seed's stage-1 export."""
  if ROLLOUTS_PER_STEP % n:
    raise ValueError(f"{n} rollouts per prompt do not divide the "
                     f"{ROLLOUTS_PER_STEP} rollouts of a step.")

  def make(seed: int, base: str):
    c = latr_grpo.setting(seed, _export(plateau_dir, seed, base,
                                        plateau_steps), steps)
    c.rl.update(prompts_per_step=ROLLOUTS_PER_STEP // n, num_samples=n)
    ref = brorl_arith.get_config().rl
    for k in ("kl_coef", "kl_estimator", "dynamic_sampling",
              "max_sampling_rounds"):
      c.rl[k] = ref[k]
    c.rl.ref_reset_every = REF_RESET_EVERY
    return c
  return make


def arms(steps: int, out: str, plateau_steps: int, names: str = ""):
  """The plateau arm first (run_arms trains it before the arms that continue
  from it), then the chosen continued arms."""
  plateau_dir = os.path.join(out, "plateau")
  cont = {name: continued_arm(n, steps, plateau_dir, plateau_steps)
          for name, n in ARMS.items()}
  return {"plateau": plateau_arm(plateau_steps),
          **common.select_arms(cont, names)}


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  common.define_flags("brorl_continue", 20)
  flags.DEFINE_integer("plateau_steps", 40, "GRPO steps of stage 1.")

  def _main(argv):
    del argv
    f = flags.FLAGS
    table = common.run_arms(
        arms(f.steps, f.out, f.plateau_steps, f.arms),
        seeds=common.seeds_flag(), base=f.base, out=f.out,
        splits=latr_grpo.SPLITS, metrics=latr_grpo.METRICS, curves=CURVES)
    print(common.markdown(table))

  app.run(_main)
