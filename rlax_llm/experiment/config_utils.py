"""Config checks that turn user mistakes into messages naming cause and fix."""

from __future__ import annotations

import difflib
import os
import tempfile
from typing import Iterable

import ml_collections


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    path = f"{prefix}{k}"
    keys.append(path)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_flat_keys(v, path + "."))
  return keys


def unknown_override_error(key: str, config: ml_collections.ConfigDict) -> str:
  """A message for an override `key` the config lacks, with close matches."""
  keys = _flat_keys(config)
  close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
  leaf = key.rsplit(".", 1)[-1]
  close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
  hint = f" Did you mean {', '.join('--config.' + k for k in close[:3])}?" if (
      close) else ""
  return (f"Unknown config key '--config.{key}': the config has no field "
          f"'{key}'.{hint} Run with --helpfull or read the config file for "
          "the available fields.")


def check_overrides(argv: Iterable[str], config: ml_collections.ConfigDict,
                    flag_name: str = "config") -> None:
  """Raises ValueError for any `--config.<key>=...` whose key does not exist."""
  keys = set(_flat_keys(config))
  prefix = f"--{flag_name}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    if key not in keys:
      raise ValueError(unknown_override_error(key, config))


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable; returns its absolute path."""
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check"):
      pass
  except OSError as e:
    raise PermissionError(
        f"The workdir {path!r} cannot be written ({e.strerror or e}). Pass a "
        "--workdir you can write to, or fix its permissions.") from e
  return path


def _require(cond: bool, msg: str):
  if not cond:
    raise ValueError(msg)


def validate(config: ml_collections.ConfigDict) -> None:
  """Range checks of an experiment config (types are checked by ConfigDict)."""
  c = config
  for section in ("task", "model", "sft", "rl", "rollout", "eval",
                  "checkpoint", "mesh"):
    _require(section in c, f"The config has no '{section}' section; derive it "
             "from configs/base.py (base.get_config()).")
  _require(c.sft.steps >= 0, f"sft.steps must be >= 0, got {c.sft.steps}.")
  _require(c.rl.steps >= 0, f"rl.steps must be >= 0, got {c.rl.steps}.")
  _require(0 <= c.sft.ce_warmup_steps <= c.sft.steps,
           f"sft.ce_warmup_steps must be in [0, sft.steps={c.sft.steps}], "
           f"got {c.sft.ce_warmup_steps}.")
  for name in ("sft.batch_size", "rl.prompts_per_step", "rl.num_samples",
               "rl.num_epochs", "rl.num_minibatches", "rl.num_microbatches",
               "rl.max_sampling_rounds",
               "eval.every", "eval.num_problems", "eval.batch_size",
               "checkpoint.every", "checkpoint.max_to_keep"):
    section, field = name.split(".")
    value = c[section][field]
    _require(value >= 1, f"{name} must be >= 1, got {value}.")
  buckets = c.rl.get("length_buckets", 0)
  _require(isinstance(buckets, int) and buckets >= 0,
           f"rl.length_buckets must be an int >= 0 (0 disables), got "
           f"{buckets!r}.")
  share = c.rl.get("share_prompt", "off")
  _require(share in SHARE_PROMPT_MODES,
           f"rl.share_prompt must be one of {SHARE_PROMPT_MODES}, got "
           f"{share!r}.")
  blocker = share_prompt_blocker(c) if share == "on" else None
  _require(blocker is None,
           f"rl.share_prompt='on' cannot work here: {blocker}. Use "
           "rl.share_prompt='auto' (on where it can be) or 'off'.")
  _require(c.eval.num_samples >= 0,
           f"eval.num_samples must be >= 0, got {c.eval.num_samples}.")
  if "reward" in c:
    _require(c.reward.num_workers >= 1, "reward.num_workers must be >= 1, "
             f"got {c.reward.num_workers}.")
    _require(c.reward.timeout_s > 0, "reward.timeout_s must be > 0, got "
             f"{c.reward.timeout_s}.")
  for name in ("sft.learning_rate", "rl.learning_rate"):
    section, field = name.split(".")
    _require(c[section][field] > 0,
             f"{name} must be > 0, got {c[section][field]}.")


SHARE_PROMPT_MODES = ("auto", "on", "off")


def share_prompt_blocker(config: ml_collections.ConfigDict) -> str | None:
  """Why the update cannot score each group's prompt once, or None.

  Shared-prompt scoring (`steps.make_rl_step(prompt_group=G)`, G =
  rl.num_samples) needs each micro-batch to hold whole groups in order.
  """
  rl = config.rl
  if rl.num_samples < 2:
    return f"rl.num_samples={rl.num_samples} gives groups of one row"
  if rl.num_minibatches > 1:
    return (f"rl.num_minibatches={rl.num_minibatches} draws each "
            "minibatch's rows at random")
  if rl.get("length_buckets", 0):
    return (f"rl.length_buckets={rl.length_buckets} orders the rows by "
            "length")
  rows = rl.prompts_per_step * rl.num_samples
  if rows % rl.num_microbatches or (rows // rl.num_microbatches) % (
      rl.num_samples):
    return (f"micro-batches of {rows} / rl.num_microbatches="
            f"{rl.num_microbatches} rows do not hold whole groups of "
            f"rl.num_samples={rl.num_samples}")
  return None


def prompt_group(config: ml_collections.ConfigDict) -> int:
  """G of the update's shared-prompt scoring (`rl.share_prompt`), 1 when off.
  """
  share = config.rl.get("share_prompt", "off")
  if share == "off" or share_prompt_blocker(config) is not None:
    return 1
  return int(config.rl.num_samples)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` the way `config_flags.DEFINE_config_file` does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Config file {path!r} does not exist. Pass --config=configs/<name>.py "
        "(relative to the repository root) or an absolute path.")
  module_spec = importlib.util.spec_from_file_location("_rlax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_spec_from_argv(argv: list[str], default: str,
                          flag_name: str = "config") -> str:
  """The `--config` value in argv (either `--config=X` or `--config X`)."""
  spec = default
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag_name}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag_name}" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def exit_on_bad_overrides(argv: list[str], default: str,
                          flag_name: str = "config") -> None:
  """Exits with a clear message for a missing config file or unknown key.

  Run before absl parses flags: ml_collections would otherwise fail at flag
  definition with a traceback.
  """
  import sys  # pylint: disable=g-import-not-at-top
  try:
    config = load_config_file(config_spec_from_argv(argv, default, flag_name))
    check_overrides(argv, config, flag_name)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


# Fields that may change when a run is resumed: they alter how the rest of the
# run is observed or stored, or extend it, but not what was already computed.
RESUMABLE_CHANGES = ("progress", "eval.", "checkpoint.", "mesh.", "rl.steps",
                     "distributed.")

# Fields added to configs/base.py after runs were stored, with the value that
# reproduces what those runs computed: a stored config without the field
# resumes when the new config holds that value.
ADDED_FIELDS = {"rl.length_buckets": 0, "rl.share_prompt": "off"}


def _flat_values(config: ml_collections.ConfigDict, prefix: str = ""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat_values(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _newest_checkpoint_step(workdir: str) -> int | None:
  """The largest step directory under `workdir/checkpoints`, if any."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except OSError:
    return None
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps) if steps else None


def _check_budget(workdir: str, saved: dict, current: dict) -> None:
  """Refuses an `rl.steps` smaller than the workdir's run was given.

  A larger value extends the run from its last checkpoint. A smaller one
  would leave a run whose metrics, checkpoints and summary describe more
  steps than its config; it is refused whether or not the run got that far.
  """
  old, new = saved.get("rl.steps"), current.get("rl.steps")
  if old is None or new is None or new >= old:
    return
  sft = current.get("sft.steps", 0)
  step = _newest_checkpoint_step(workdir)
  reached = (f"its newest checkpoint is at step {step} (SFT {sft} + RL "
             f"{max(step - sft, 0)})" if step is not None
             else "it has no checkpoint yet")
  raise ValueError(
      f"--config.rl.steps={new} is smaller than the {old} RL steps the run in "
      f"{workdir!r} was started with ({reached}); a run's budget can be "
      f"extended but not shrunk. Re-run with --config.rl.steps={old} (or "
      "larger, to extend it), or use a new --workdir for a shorter run.")


def check_resume_config(workdir: str, config: ml_collections.ConfigDict, *,
                        resuming: bool) -> None:
  """Stores the config of a new run; refuses to resume with a different one.

  Of the fields that may change on resume (`RESUMABLE_CHANGES`), `rl.steps`
  may only grow: a larger value extends the run (the stored config then
  holds the new budget), a smaller one is refused.

  Raises:
    ValueError: naming the fields that differ from the workdir's run, or
      the smaller `rl.steps` and the values that would resume it.
  """
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if resuming and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    a = _flat_values(ml_collections.ConfigDict(saved))
    b = _flat_values(ml_collections.ConfigDict(current))
    for k, v in ADDED_FIELDS.items():
      if k not in a and b.get(k) == v:
        a[k] = v
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and not k.startswith(RESUMABLE_CHANGES))
    if diff:
      shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8])
      raise ValueError(
          f"The workdir {workdir!r} holds a run with a different config "
          f"({shown}). Resuming would mix two experiments: use a new "
          "--workdir, or restore the original values.")
    _check_budget(workdir, a, b)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # one writer in a multi-process run
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("rlax_llm:config.json")
