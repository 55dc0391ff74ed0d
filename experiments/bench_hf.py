"""Host memory of loading an HF checkpoint with `rlax_llm.models.hf`.

  python -m experiments.bench_hf [--dtype=bfloat16|float32] \
      [--shard_size=200MB] [--layers=24] [--workdir=DIR] [--keep]

Writes a randomly initialised model of Qwen2.5-0.5B's shape (vocabulary
151,936, width 896, 24 layers, 14 heads, 2 KV heads, MLP 4,864, tied
embedding) as a sharded HF checkpoint (config.json, shards of `--shard_size`,
model.safetensors.index.json). The writer streams: each tensor is generated,
written and dropped, so writing never holds the model. Then a fresh Python
process imports jax, records its peak RSS (VmHWM of /proc/self/status, the
peak of this process image; `resource.getrusage`'s ru_maxrss where /proc is
missing, though on Linux it also counts the parent's peak carried over fork
and exec) as the baseline, runs `load_pretrained` and records the peak again. The record
reports the peak growth against the checkpoint size on disk: a loader that
streams tensors stays near 1x (the parameters themselves, held once), one that
materialises an initialised copy or reads the whole file first needs 2x+.

Prints one JSON object per line (one record for the write, one for the load).
The bf16 default (~1 GB on disk) runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from rlax_llm.models import hf
from rlax_llm.models.config import PRESETS, ModelConfig

_LOAD = """
import json, resource, sys, time


def peak_kib():
  # VmHWM is this process image's peak RSS. ru_maxrss would also carry the
  # parent's peak over fork + exec, so it is the fallback only.
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1])
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


import jax
import jax.numpy as jnp
import numpy as np
from rlax_llm.models import hf
base = peak_kib()
t0 = time.perf_counter()
model = hf.load_pretrained(sys.argv[1], dtype=jnp.dtype(sys.argv[2]))
leaves = jax.tree.leaves(jax.block_until_ready(
    __import__("flax.nnx", fromlist=["nnx"]).state(model)))
load_s = time.perf_counter() - t0
peak = peak_kib()
param_bytes = sum(x.nbytes for x in leaves)
logits = model(jnp.arange(8)[None] % 1000)
print(json.dumps(dict(baseline_kib=base, peak_kib=peak, load_s=load_s,
                      param_bytes=param_bytes,
                      logits_finite=bool(np.isfinite(np.asarray(logits)).all()))))
"""


def _parse(args):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dtype", default="bfloat16",
                 choices=["bfloat16", "float32"])
  p.add_argument("--shard_size", default="200MB")
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--vocab", type=int, default=151_936)
  p.add_argument("--workdir", default=None,
                 help="where to write the checkpoint (default: a temp dir)")
  p.add_argument("--keep", action="store_true",
                 help="keep the checkpoint afterwards")
  return p.parse_args(args)


def write_random_checkpoint(path: str, cfg: ModelConfig, dtype,
                            shard_size, seed: int = 0) -> dict:
  """Writes a random HF checkpoint of `cfg` tensor by tensor; returns stats."""
  rng = np.random.default_rng(seed)
  specs = hf.hf_tensor_specs(cfg, dtype)
  shapes = {name: shape for name, shape, _ in specs}
  np_dtype = np.dtype(dtype)

  def fetch(name):
    shape = shapes[name]
    if name.endswith("norm.weight"):
      return np.ones(shape, np_dtype)
    return (0.02 * rng.standard_normal(shape, np.float32)).astype(np_dtype)

  os.makedirs(path, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(path, hf.CONFIG_NAME), "w") as f:
    json.dump(hf.config_to_hf(cfg, dtype=np_dtype), f, indent=2)
  files = hf.write_weights(path, specs, fetch, max_shard_size=shard_size)
  size = sum(os.path.getsize(os.path.join(path, f)) for f in files
             if f.endswith(".safetensors"))
  return dict(write_s=time.perf_counter() - t0, checkpoint_bytes=size,
              num_shards=sum(f.endswith(".safetensors") for f in files),
              num_tensors=len(specs))


def run(args=None) -> list[dict]:
  """Writes the checkpoint, measures loading it; returns the records."""
  opts = _parse(args)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(opts.dtype)
  fields = dict(PRESETS["qwen2_5_0_5b"], num_layers=opts.layers)
  cfg = ModelConfig(vocab_size=opts.vocab, param_dtype=dtype, dtype=dtype,
                    **fields)
  workdir = opts.workdir or tempfile.mkdtemp(prefix="bench_hf_")
  path = os.path.join(workdir, "qwen2_5_0_5b_random")
  records = []
  try:
    write = write_random_checkpoint(path, cfg, dtype, opts.shard_size)
    records.append(dict(what="write", dtype=opts.dtype,
                        num_params=cfg.num_params, **write))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _LOAD, path, opts.dtype],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
      raise RuntimeError(f"Loading failed:\n{out.stderr[-4000:]}")
    load = json.loads(out.stdout.strip().splitlines()[-1])
    grown = (load["peak_kib"] - load["baseline_kib"]) * 1024
    records.append(dict(
        what="load", dtype=opts.dtype,
        checkpoint_bytes=write["checkpoint_bytes"],
        param_bytes=load["param_bytes"], load_s=round(load["load_s"], 3),
        rss_baseline_mib=round(load["baseline_kib"] / 1024, 1),
        rss_peak_mib=round(load["peak_kib"] / 1024, 1),
        rss_growth_mib=round(grown / 2**20, 1),
        growth_over_checkpoint=round(grown / write["checkpoint_bytes"], 3),
        logits_finite=load["logits_finite"]))
  finally:
    if not opts.keep:
      shutil.rmtree(path, ignore_errors=True)
      if opts.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
  return records


def main(argv=None):
  for rec in run(sys.argv[1:] if argv is None else argv):
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
