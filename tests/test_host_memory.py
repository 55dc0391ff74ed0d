"""XLA's CPU programs reuse their scratch memory (`reuse_host_memory`).

A compiled program's temporaries live in one block allocated per call. With
glibc's default malloc a block that large is a fresh mmap each call, so
every call faults in all of its pages again; with the settings applied a
later call finds the block in the heap and faults in (almost) nothing.
Not every later call does: now and then small allocations made between two
calls split the freed block, and that call's block comes from fresh heap
(measured on this program: 31 of 396 later calls, at most 4 in a row). So
each run makes 9 calls after the first, and "found again" means at least
one of them faulted in less than a twentieth of the block. The page count
to compare with is the block's own size, from XLA's memory analysis of the
program.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap

import jax
import pytest

from rlax_llm.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROGRAM = textwrap.dedent("""
    import json, resource, sys
    from rlax_llm.parallel import distributed
    import jax, jax.numpy as jnp
    reused = distributed.reuse_host_memory(sys.argv[1], layout=sys.argv[2])

    def f(x):
      s = x @ x.T  # [4096, 4096] f32: 64 MiB, read twice, so materialised
      return jnp.sum(jax.nn.softmax(s, axis=-1) @ x) + jnp.sum(s)

    x = jnp.ones((4096, 64), jnp.float32) / 64
    compiled = jax.jit(f).lower(x).compile()
    faults = []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      compiled(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    - before)
    print(json.dumps({"reused": reused, "faults": faults,
                      "temp": compiled.memory_analysis().temp_size_in_bytes}))
""")

_GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="the settings are glibc's malloc's")
def test_second_call_reuses_the_scratch_block(tmp_path):
  script = tmp_path / "program.py"
  script.write_text(_PROGRAM)
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
  base.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  two = " ".join([os.environ.get("XLA_FLAGS", ""),
                  "--xla_force_host_platform_device_count=2"])
  # The "split" host layout runs the large programs (the updates) on the
  # first device alone, as the program here does on two devices.
  runs = {"reuse": ("reuse", {}, "shared"),
          "default": ("default", {}, "shared"),
          "auto": ("auto", {}, "shared"),
          "auto_user_tuned": ("auto", {"MALLOC_ARENA_MAX": "4"}, "shared"),
          "auto_two_devices": ("auto", {"XLA_FLAGS": two}, "shared"),
          "auto_two_devices_split": ("auto", {"XLA_FLAGS": two}, "split")}
  procs = {name: subprocess.Popen(
      [sys.executable, str(script), mode, layout], env=dict(base, **extra),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, (mode, extra, layout) in runs.items()}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    out[name] = json.loads(stdout.strip().splitlines()[-1])
  pages = out["reuse"]["temp"] / os.sysconf("SC_PAGESIZE")
  assert out["reuse"]["temp"] >= 64 * 2**20, out
  # Applied where asked, by "auto" on this one-device CPU run and on two
  # devices with the updates on one, not where the user tunes malloc through
  # the environment or with two CPU devices sharing the updates.
  assert ([out[n]["reused"] for n in runs]
          == [True, False, True, False, False, True]), out
  for name in ("reuse", "auto", "auto_two_devices_split"):  # found again
    assert min(out[name]["faults"][1:]) < pages / 20, (name, pages, out)
  for name in ("default", "auto_user_tuned"):  # fresh pages every call
    assert min(out[name]["faults"][1:]) > pages / 2, (name, pages, out)


def test_modes_and_their_errors(monkeypatch):
  jax.devices()  # this process's backends have started
  with pytest.raises(RuntimeError, match="before the first JAX operation"):
    distributed.reuse_host_memory("reuse")
  assert distributed.reuse_host_memory("auto") is False
  assert distributed.reuse_host_memory("default") is False
  with pytest.raises(ValueError, match="'always' is not one of"):
    distributed.reuse_host_memory("always")
  with pytest.raises(ValueError, match=r"distributed.host_memory='on'"):
    distributed.plan({"host_memory": "on"}, {}, tpu_present=False)
  # Several CPU devices are refused before anything is set.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert distributed.planned_cpu_devices() == 4
  with pytest.raises(RuntimeError, match="with 4 CPU devices"):
    distributed.reuse_host_memory("reuse")
  assert distributed.reuse_host_memory("auto") is False
  # With the updates on one device the device count is no objection; the
  # started backends still are.
  with pytest.raises(RuntimeError, match="before the first JAX operation"):
    distributed.reuse_host_memory("reuse", layout="split")
  assert distributed.reuse_host_memory("auto", layout="split") is False
  with pytest.raises(ValueError, match="'sideways' is not 'shared' or"):
    distributed.reuse_host_memory("auto", layout="sideways")
  with pytest.raises(ValueError, match=r"distributed.host_layout='both'"):
    distributed.plan({"host_layout": "both"}, {}, tpu_present=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
  assert distributed.planned_cpu_devices() == len(jax.devices("cpu"))


@pytest.mark.parametrize("platforms, plugins, want", [
    (None, [], True),
    ("", [], True),
    (None, ["cuda"], False),
    ("cpu", ["cuda"], True),
    ("cuda,cpu", [], False),
    ("tpu", [], False),
    (" cpu ", ["libtpu"], True),
])
def test_cpu_only(platforms, plugins, want):
  assert distributed.cpu_only(platforms, plugins) is want


def test_accelerator_plugins_of_this_installation():
  # The suite runs on a CPU-only installation (jax[cpu]); a CUDA, ROCm or
  # TPU plugin here would be found.
  found = distributed.accelerator_plugins()
  assert isinstance(found, list) and found == sorted(found)
  assert distributed.cpu_only(None, found) == (jax.default_backend() == "cpu")
