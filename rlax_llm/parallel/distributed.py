"""Multi-process start-up and per-process batches.

One Python process runs per host (TPU VM worker, GPU node) or per GPU. All of
them run the same program; `initialize` connects them before anything touches
devices, after which `jax.devices()` lists every process's devices and one
jitted step spans them all.

Where the connection details come from, in order:
  1. an explicit coordinator: the config section's `coordinator_address`,
     `num_processes`, `process_id` (or the environment variables
     RLAX_COORDINATOR_ADDRESS, RLAX_NUM_PROCESSES, RLAX_PROCESS_ID);
  2. SLURM, inside an `srun` step: the coordinator is the first node of
     SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST), num_processes is
     SLURM_NTASKS and process_id SLURM_PROCID;
  3. a Cloud TPU VM: JAX reads the pod's workers from the TPU metadata;
  4. otherwise a single process, and `initialize` does nothing.

Batches: each process loads only the rows of the global batch that its own
devices hold (`process_batch_slice`) and `host_local_to_global` assembles the
global, sharded array from those pieces without any process holding it all.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from rlax_llm.parallel import mesh as mesh_lib

METHODS = ("auto", "none", "explicit", "slurm", "tpu")
ENV_PREFIX = "RLAX_"

# Defaults of the config section `distributed` (configs/base.py) for the
# fields a section leaves out. One differs: host_devices is 0 here, so that
# `initialize()` called by a program that has already used JAX keeps its
# devices; the experiments' configs split a CPU host per core (-1).
DEFAULTS: dict[str, Any] = dict(
    method="auto",
    coordinator_address="",
    num_processes=0,
    process_id=-1,
    local_device_ids="",
    coordinator_port=0,
    initialization_timeout=300,
    cpu_collectives="gloo",
    host_devices=0,
    host_memory="auto",
    host_layout="auto",
)

HOST_MEMORY_MODES = ("auto", "reuse", "default")
# "shared": rollouts, evaluation and updates on one mesh (`config.mesh`);
# "split": rollouts and evaluation on a data mesh over every device, the
# updates on the first device alone (`mesh.layout_meshes`); "auto": split
# for one CPU-only process with several devices and a data-only mesh
# (`mesh.choose_layout`).
HOST_LAYOUTS = mesh_lib.HOST_LAYOUTS

_SLURM_PORT_BASE = 45000  # SLURM coordinator port: base + job id % 10000


class Plan(NamedTuple):
  """How (and whether) this process joins a multi-process run.

  Attributes:
    method: "none" (single process), "explicit", "slurm" or "tpu".
    coordinator_address: "host:port" of process 0's coordinator service, or
      None where JAX finds it itself (TPU).
    num_processes: total processes, None where JAX finds it.
    process_id: this process's index in [0, num_processes), or None.
    local_device_ids: the local devices this process uses, None for all.
  """
  method: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def _section(section) -> dict[str, Any]:
  values = dict(DEFAULTS)
  if section is not None:
    items = dict(section.items())
    unknown = set(items) - set(DEFAULTS)
    if unknown:
      raise ValueError(f"Unknown distributed config fields {sorted(unknown)}; "
                       f"the fields are {sorted(DEFAULTS)}.")
    values.update(items)
  if values["method"] not in METHODS:
    raise ValueError(f"distributed.method={values['method']!r} is not one of "
                     f"{METHODS}.")
  if values["host_memory"] not in HOST_MEMORY_MODES:
    raise ValueError(f"distributed.host_memory={values['host_memory']!r} is "
                     f"not one of {HOST_MEMORY_MODES}.")
  if values["host_layout"] not in HOST_LAYOUTS:
    raise ValueError(f"distributed.host_layout={values['host_layout']!r} is "
                     f"not one of {HOST_LAYOUTS}.")
  return values


def _int(value, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _device_ids(text) -> tuple[int, ...] | None:
  if text is None or text == "" or text == ():
    return None
  if isinstance(text, (list, tuple)):
    return tuple(int(t) for t in text)
  try:
    return tuple(int(t) for t in str(text).split(",") if t.strip())
  except ValueError:
    raise ValueError(f"local_device_ids={text!r} must be comma-separated "
                     "integers such as '0,1'.") from None


def first_slurm_host(nodelist: str) -> str:
  """The first hostname of a SLURM node list.

  Examples: "gpu07" -> "gpu07"; "gpu[003-010,012],cpu1" -> "gpu003";
  "rack1-n[09-12]" -> "rack1-n09".
  """
  nodelist = nodelist.strip()
  m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist)
  if not m or not (m.group(1) or m.group(2)):
    raise ValueError(f"Cannot read a host from SLURM node list {nodelist!r}.")
  prefix, ranges = m.group(1), m.group(2)
  if ranges is None:
    return prefix
  first = re.split(r"[,-]", ranges)[0]
  return prefix + first


def _explicit(values, env) -> Plan | None:
  addr = values["coordinator_address"] or env.get(
      ENV_PREFIX + "COORDINATOR_ADDRESS", "")
  num = values["num_processes"] or _int(
      env.get(ENV_PREFIX + "NUM_PROCESSES", 0), ENV_PREFIX + "NUM_PROCESSES")
  pid = values["process_id"]
  if pid is None or pid < 0:
    pid = _int(env.get(ENV_PREFIX + "PROCESS_ID", -1),
               ENV_PREFIX + "PROCESS_ID")
  local = _device_ids(values["local_device_ids"]) or _device_ids(
      env.get(ENV_PREFIX + "LOCAL_DEVICE_IDS"))
  if not addr:
    if num > 1 or values["method"] == "explicit":
      raise ValueError(
          f"num_processes={num} but no coordinator address: set "
          "distributed.coordinator_address='host:port' (process 0's host and "
          f"a free port) or {ENV_PREFIX}COORDINATOR_ADDRESS.")
    return None
  if ":" not in addr:
    raise ValueError(f"Coordinator address {addr!r} needs a port, e.g. "
                     f"'{addr}:12355'.")
  if num < 1:
    raise ValueError(
        f"Coordinator {addr!r} given but not the number of processes: set "
        f"distributed.num_processes or {ENV_PREFIX}NUM_PROCESSES.")
  if not 0 <= pid < num:
    raise ValueError(
        f"process_id={pid} is not in [0, {num}): give every process its own "
        f"index with distributed.process_id or {ENV_PREFIX}PROCESS_ID.")
  return Plan("explicit", addr, num, pid, local)


def _in_slurm_step(env) -> bool:
  return (all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS",
                                 "SLURM_PROCID"))
          and ("SLURM_STEP_NODELIST" in env or "SLURM_STEP_ID" in env))


def _slurm(values, env) -> Plan:
  nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
  if not nodelist:
    raise ValueError("SLURM step without SLURM_STEP_NODELIST or "
                     "SLURM_JOB_NODELIST; launch with `srun`, or set "
                     "distributed.coordinator_address explicitly.")
  port = (values["coordinator_port"]
          or _int(env.get(ENV_PREFIX + "COORDINATOR_PORT", 0),
                  ENV_PREFIX + "COORDINATOR_PORT")
          or _SLURM_PORT_BASE + _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID")
          % 10000)
  num = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
  pid = _int(env["SLURM_PROCID"], "SLURM_PROCID")
  local = _device_ids(values["local_device_ids"]) or _device_ids(
      env.get(ENV_PREFIX + "LOCAL_DEVICE_IDS"))
  if local is None and "SLURM_LOCALID" in env:
    # Several tasks on one node that all see every GPU: one GPU each.
    nodes = _int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", num)),
                 "SLURM_STEP_NUM_NODES")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if num > nodes and (visible is None or "," in visible):
      local = (_int(env["SLURM_LOCALID"], "SLURM_LOCALID"),)
  return Plan("slurm", f"{first_slurm_host(nodelist)}:{port}", num, pid, local)


def _tpu_present(env) -> bool:
  if any(k in env for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE",
                            "MEGASCALE_COORDINATOR_ADDRESS")):
    return True
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return False


def plan(section=None, environ: Mapping[str, str] | None = None, *,
         tpu_present: bool | None = None) -> Plan:
  """Decides how this process joins the run; touches no device.

  Args:
    section: the config's `distributed` section (a ConfigDict or dict with
      the fields of `DEFAULTS`), or None for the defaults.
    environ: environment variables, default `os.environ`.
    tpu_present: overrides the Cloud TPU probe (for tests).

  Raises:
    ValueError: for incomplete or inconsistent settings, naming the field
      or variable to set.
  """
  values = _section(section)
  env = os.environ if environ is None else environ
  method = values["method"]
  if method == "none":
    return Plan("none")
  if method in ("auto", "explicit"):
    found = _explicit(values, env)
    if found is not None:
      return found
  if method == "slurm" or (method == "auto" and _in_slurm_step(env)):
    if method == "slurm" and not _in_slurm_step(env):
      raise ValueError("distributed.method='slurm' but this process is not "
                       "inside an `srun` step (SLURM_JOB_ID, SLURM_NTASKS, "
                       "SLURM_PROCID, SLURM_STEP_NODELIST unset).")
    found = _slurm(values, env)
    if method == "slurm" or found.num_processes > 1:
      return found
  if tpu_present is None:
    tpu_present = method == "tpu" or (method == "auto" and _tpu_present(env))
  if method == "tpu" or (method == "auto" and tpu_present):
    return Plan("tpu")
  return Plan("none")


def initialize(section=None, mesh=None) -> Plan:
  """Connects the processes of a multi-process run (no-op for one process).

  Call it first thing in `main`, before anything creates a device array or
  asks for `jax.devices()`. Calling it again is harmless. It also splits a
  CPU host into `host_devices` devices (`use_host_devices`) and sets how
  host memory is reused (`host_memory`, see `reuse_host_memory`, for the
  `host_layout` that `mesh` gives: `mesh.choose_layout`).

  Args:
    section: the config's `distributed` section, or None to rely on the
      environment (SLURM, TPU, RLAX_* variables) alone.
    mesh: the config's `mesh` sizes, with which an "auto" host layout is
      resolved before JAX starts; None counts "auto" as "shared" for the
      memory settings (the safe side: no reuse with several CPU devices).

  Returns:
    The `Plan` that was followed.

  Raises:
    ValueError: for incomplete settings (see `plan`).
    RuntimeError: when devices were already in use before this call.
  """
  values = _section(section)
  p = plan(section)
  use_host_devices(int(values["host_devices"]))
  layout = values["host_layout"]
  if layout == "auto":
    # (Several processes count as 2: "auto" asks only whether there is one.)
    layout = "shared" if mesh is None else mesh_lib.choose_layout(
        layout, mesh, processes=1 if p.method == "none" else 2,
        cpu=cpu_only(jax.config.jax_platforms, accelerator_plugins()),
        devices=planned_cpu_devices())
  reuse_host_memory(values["host_memory"], layout=layout)
  if p.method == "none" or jax.distributed.is_initialized():
    return p
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
        "rlax_llm.parallel.distributed.initialize() ran after devices were "
        "already in use, so this process cannot join the others. Call it at "
        "the start of main, before any jax.devices() or array creation.")
  if values["cpu_collectives"]:
    jax.config.update("jax_cpu_collectives_implementation",
                      values["cpu_collectives"])
  timeout = int(values["initialization_timeout"])
  if p.method == "tpu":
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    jax.distributed.initialize(
        coordinator_address=p.coordinator_address,
        num_processes=p.num_processes, process_id=p.process_id,
        local_device_ids=(list(p.local_device_ids)
                          if p.local_device_ids is not None else None),
        initialization_timeout=timeout)
  return p


def host_core_count() -> int:
  """Cores this process may run on (its CPU affinity where the OS tells)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def use_host_devices(count: int = -1) -> int:
  """Splits the CPU into `count` JAX devices (-1: one per core), before use.

  JAX gives a CPU-only host one device, whose loops and elementwise kernels
  run on one core. With one device per core, arrays sharded over the "data"
  mesh axis run on every core (the devices are threads of this process):
  rollouts decode their share of the prompts in parallel
  (`sampling.generate_on_mesh`) and update steps split the batch. Results
  equal the one-device results up to the order of floating-point sums.

  It only changes CPU devices: on a GPU or TPU host the accelerators stay
  the default devices. `--xla_force_host_platform_device_count` in XLA_FLAGS,
  where set, wins (the test suite's fake devices).

  Args:
    count: CPU devices; -1 takes `host_core_count()`, 0 leaves JAX's default.

  Returns:
    The number of CPU devices JAX will have (0 when left to JAX).

  Raises:
    RuntimeError: when JAX already runs with a different number of CPU
      devices (the setting is read once, at the first JAX operation).
  """
  if count == 0 or "xla_force_host_platform_device_count" in os.environ.get(
      "XLA_FLAGS", ""):
    return 0
  if count < -1:
    raise ValueError(f"count must be -1 (one device per core), 0 (JAX's "
                     f"default) or positive, got {count}.")
  n = host_core_count() if count == -1 else int(count)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    have = len(jax.devices("cpu"))
    if have != n:
      raise RuntimeError(
          f"JAX already runs with {have} CPU device(s), so it cannot be split "
          f"into {n}: use_host_devices must run before the first JAX "
          "operation (set distributed.host_devices=0 to keep the current "
          "devices, or restart the process).")
    return n
  jax.config.update("jax_num_cpu_devices", n)
  return n


# glibc's mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Free heap kept at the top before glibc returns it to the OS: mallopt
# takes an int, so 2 GiB - 1 is the most it can keep.
_TRIM_THRESHOLD = 2**31 - 1
# Environment variables through which a user tunes glibc's malloc; "auto"
# leaves their settings alone.
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def accelerator_plugins() -> list[str]:
  """The non-CPU JAX backends installed for this interpreter.

  JAX's PJRT plugins (entry points and `jax_plugins.*` modules: CUDA, ROCm,
  ...) and libtpu, by name; empty on a CPU-only installation. Nothing is
  imported or initialised.
  """
  names = {ep.name for ep in importlib.metadata.entry_points(
      group="jax_plugins")}
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    for path in spec.submodule_search_locations:
      if os.path.isdir(path):
        names.update(n.split(".")[0] for n in os.listdir(path)
                     if not n.startswith(("_", ".")))
  if importlib.util.find_spec("libtpu") is not None:
    names.add("libtpu")
  return sorted(names)


def cpu_only(platforms: str | None, plugins) -> bool:
  """Whether JAX runs on the CPU alone, given `jax_platforms` and plugins.

  An explicit `jax_platforms` list decides ("cpu" alone, or with nothing
  else); unset, JAX picks an accelerator when any plugin is installed.
  """
  if platforms:
    return {p.strip() for p in platforms.split(",") if p.strip()} <= {"cpu"}
  return not plugins


def planned_cpu_devices() -> int:
  """The CPU devices JAX will make (or made): forced, configured or 1.

  `--xla_force_host_platform_device_count` in XLA_FLAGS wins, then
  `jax_num_cpu_devices` (what `use_host_devices` sets); JAX's default is
  one. Nothing is initialised.
  """
  forced = re.findall(r"xla_force_host_platform_device_count=(\d+)",
                      os.environ.get("XLA_FLAGS", ""))
  if forced:
    return int(forced[-1])
  configured = jax.config.jax_num_cpu_devices
  return configured if configured and configured > 0 else 1


def reuse_host_memory(mode: str = "reuse", *,
                      layout: str = "shared") -> bool:
  """Lets XLA's CPU programs reuse the host memory of their previous call.

  XLA's CPU runtime allocates one scratch block per call of a compiled
  program (all its temporaries: an update step's saved activations, often
  hundreds of MB) and frees it when the call returns. glibc's malloc serves
  a block that large with a fresh mmap and unmaps it on free, so every call
  faults in and zeroes every page again (the GRPO bench's update on one
  device: 796 MB, about 195,000 page faults and 0.35 s of kernel time per
  call, on top of a 1.1 s step). "reuse" sets three of glibc's malloc
  parameters (mallopt(3)): one arena for all threads, no mmap for large
  blocks (they come from the heap), and up to 2 GiB of free heap kept
  instead of returned to the OS. The block is then allocated once and
  reused: the process keeps its peak heap for its lifetime, and its threads
  share one allocator lock. Now and then a call still gets fresh heap, when
  small allocations made between two calls have split the freed block
  (tests/test_host_memory.py's program: about 1 call in 13 after the first).

  Only where the large programs run on one CPU device: several CPU devices
  running an update allocate their blocks concurrently from the one heap,
  and their changing order fragments it (measured: the GRPO bench on 2
  devices grew its heap by one 358 MiB block every second step, without
  bound), so "reuse" is refused there and "auto" leaves malloc alone. The
  "split" host layout (`distributed.host_layout`) is such a place: its
  updates run on the first device alone while rollouts decode on a device
  per core, whose scratch blocks are small (the GRPO bench: 0 faults per
  update and a steady heap over 20 steps).

  Call it before the first JAX operation: XLA's threads start then, and a
  thread that has allocated keeps its own arena (and the mmap of large
  blocks). It changes the whole process, torch or anything else in it
  included.

  Args:
    mode: "reuse" applies the settings (an error where it cannot); "auto"
      applies them when JAX will run on the CPU only (`jax_platforms` is
      "cpu", or no GPU/TPU plugin is installed) with its updates on one
      device (`planned_cpu_devices` is 1, or `layout` is "split"), glibc is
      the C library, JAX has not started yet and no MALLOC_* variable (or a
      glibc.malloc tunable) sets malloc's behaviour already, and otherwise
      does nothing; "default" does nothing.
    layout: the run's `distributed.host_layout` ("shared" or "split").

  Returns:
    Whether the settings were applied.

  Raises:
    ValueError: for an unknown mode.
    RuntimeError: "reuse" where the C library is not glibc, with several CPU
      devices sharing the updates, or after JAX's backends started.
  """
  if mode not in HOST_MEMORY_MODES:
    raise ValueError(f"host memory mode {mode!r} is not one of "
                     f"{HOST_MEMORY_MODES}.")
  if layout not in ("shared", "split"):
    raise ValueError(f"host layout {layout!r} is not 'shared' or 'split' "
                     "(resolve 'auto' with parallel.choose_layout first).")
  if mode == "default":
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  glibc = platform.libc_ver()[0] == "glibc"
  devices = 1 if layout == "split" else planned_cpu_devices()
  started = xla_bridge.backends_are_initialized()
  if mode == "auto":
    tuned = (any(v in os.environ for v in _MALLOC_ENV)
             or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))
    if (not glibc or devices != 1 or started or tuned
        or not cpu_only(jax.config.jax_platforms, accelerator_plugins())):
      return False
  elif not glibc:
    raise RuntimeError(
        "host_memory='reuse' sets glibc's malloc parameters, and this "
        f"process's C library is {platform.libc_ver()[0] or 'not glibc'}: "
        "use host_memory='default'.")
  elif devices != 1:
    raise RuntimeError(
        f"host_memory='reuse' with {devices} CPU devices: their concurrent "
        "scratch blocks fragment the one heap, which then grows without "
        "bound; use one CPU device (distributed.host_devices=0), the "
        "updates on one device (distributed.host_layout='split') or "
        "host_memory='default'.")
  elif started:
    raise RuntimeError(
        "host_memory='reuse' must run before the first JAX operation "
        "(XLA's threads have started and keep their own allocators): call "
        "rlax_llm.parallel.reuse_host_memory first thing in main, or use "
        "host_memory='default'.")
  libc = ctypes.CDLL(None)
  for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                       (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f"glibc's mallopt({param}, {value}) failed; use "
                         "host_memory='default'.")
  return True


def is_primary() -> bool:
  """True on process 0, the one that writes logs and summaries."""
  return jax.process_index() == 0


def process_batch_indices(global_batch_size: int, mesh: Mesh,
                          rules: Mapping[str, Any] = mesh_lib.DEFAULT_RULES
                          ) -> np.ndarray:
  """The sorted rows of the global batch that this process's devices hold.

  Raises:
    ValueError: when the batch does not split over the mesh's batch axes.
  """
  mult = mesh_lib.batch_size_multiple(mesh, rules)
  if global_batch_size % mult:
    raise ValueError(
        f"Global batch of {global_batch_size} rows does not split over the "
        f"{mult} batch shards of the mesh (axes "
        f"{mesh_lib.batch_axes(rules)}); use a multiple of {mult}.")
  sharding = mesh_lib.batch_sharding(mesh, 1, rules)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for (idx,) in index_map.values():
    rows.update(range(*idx.indices(global_batch_size)))
  return np.asarray(sorted(rows), np.int64)


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None,
                        rules: Mapping[str, Any] = mesh_lib.DEFAULT_RULES
                        ) -> slice:
  """The rows of the global batch this process loads.

  Args:
    global_batch_size: rows of the batch one step consumes, over all
      processes.
    mesh: the training mesh; its batch sharding decides the rows. None
      splits the rows evenly in process order (what `make_mesh` produces).
    rules: sharding rules, for the batch axes.

  Raises:
    ValueError: when the rows do not split evenly, or when this process's
      rows are not contiguous on `mesh` (use `process_batch_indices`).
  """
  if mesh is None:
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
      raise ValueError(
          f"Global batch of {global_batch_size} rows does not split over "
          f"{n} processes; use a multiple of {n}.")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)
  rows = process_batch_indices(global_batch_size, mesh, rules)
  if rows[-1] - rows[0] + 1 != len(rows):
    raise ValueError(
        "This process's rows of the batch are not contiguous on this mesh; "
        "load them with process_batch_indices() instead.")
  return slice(int(rows[0]), int(rows[-1]) + 1)


def host_local_to_global(batch_tree, mesh: Mesh,
                         rules: Mapping[str, Any] = mesh_lib.DEFAULT_RULES, *,
                         global_batch_size: int | None = None):
  """Assembles global batch arrays from each process's own rows.

  Every process calls it with its rows (`process_batch_slice`) of each leaf;
  the result is one jax.Array per leaf with the global batch, sharded along
  the leading axis over the mesh's batch axes.

  Args:
    batch_tree: pytree of host arrays [n_local, ...].
    mesh: the mesh the step runs on.
    rules: sharding rules, for the batch axes.
    global_batch_size: the global row count; default n_local times the
      number of process row blocks.

  Raises:
    ValueError: when a leaf's row count is not this process's share.
  """
  def place(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("Batch leaves need a leading batch axis; got a scalar.")
    sharding = mesh_lib.batch_sharding(mesh, x.ndim, rules)
    shape = None
    if global_batch_size is not None:
      want = len(process_batch_indices(global_batch_size, mesh, rules))
      if x.shape[0] != want:
        raise ValueError(
            f"This process holds {want} of the {global_batch_size} rows but "
            f"was given {x.shape[0]}; feed it its process_batch_slice() rows.")
      shape = (global_batch_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(place, batch_tree)


def global_batch_to_devices(batch_tree, mesh: Mesh,
                            rules: Mapping[str, Any] = mesh_lib.DEFAULT_RULES):
  """Places a batch that every process holds in full (identical everywhere).

  Each process copies only its own rows to its devices. jax.Arrays are
  resharded onto the batch sharding.
  """
  def place(x):
    if isinstance(x, jax.Array) and (jax.process_count() == 1
                                     or not x.is_fully_addressable):
      return jax.device_put(x, mesh_lib.batch_sharding(mesh, x.ndim, rules))
    x = np.asarray(x)
    sharding = mesh_lib.batch_sharding(mesh, x.ndim, rules)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(place, batch_tree)
