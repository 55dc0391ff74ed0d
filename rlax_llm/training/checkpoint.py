"""Orbax checkpoints of the train state plus a small JSON of run metadata.

Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves no checkpoint that `latest_step`
would pick up; the previous one stays the latest. Such leftovers are removed
by the next `Checkpointer` on the directory (in the background from when it
opens, at the latest by the end of its first save).

Integrity. After Orbax commits a step, `save` seals it: it writes
`<step>/integrity.json`, the size and SHA-256 of every file of the step
(arrays, array metadata, the JSON metadata). `latest_step` returns the newest
step whose files still match their seal. A step that does not match (a
truncated or rewritten file, a missing one, unreadable JSON) is reported on
stderr by step, moved aside to `<directory>/damaged/step_<N>` (never deleted)
and the next older step is tried. A committed step without a seal (written
before seals existed, or a run killed between Orbax's commit and the seal) is
checked by reading it completely (the JSON metadata and every array, to host
memory) and sealed if it reads. When no intact step is left and some were
moved aside, `latest_step` raises `DamagedCheckpointError` naming the
directory and the fix, so a re-run never silently starts over beside the
damaged ones. `restore` and `restore_meta` check the seal of the step they
read too (once per step and `Checkpointer`).

Failed saves. A save that raises (no space left on the device, a read-only
or vanished file system) leaves the previous checkpoints as they were: a
half-written temporary directory is removed, a committed but unsealed step
is moved aside, and `CheckpointWriteError` (an `OSError` with the original
errno) names the step, the cause, the intact step and the fix.

Fault injection, for tests of the above: with the environment variable
`RLAX_FAULT_KILL_IN_SAVE=<step>:<phase>` the process SIGKILLs itself while
saving checkpoint `<step>`, at `<phase>`:
  * `arrays`: while Orbax writes the step's temporary directory (a watcher
    thread kills as soon as an array file appears there; if the write
    finishes first, when Orbax renames that directory into place, so the
    step is never committed);
  * `commit`: after Orbax's commit, before the seal is written;
  * `seal`: with the seal's temporary file written but not yet renamed.
It is read on every save and does nothing when unset.

Multi-process runs: every process constructs the `Checkpointer` on the same
directory (a shared file system) and every process calls `save`,
`latest_step` and `restore`. Each process writes the array shards its
devices hold; the JSON metadata, the final rename, the seal and moving
damaged steps aside are done by process 0 after all processes have finished
writing (every process checks seals, and all reach the same verdict).

Arrays are stored as global arrays with no trace of the mesh that wrote
them: `restore` places them on whatever shardings it is given, so a
checkpoint written on one mesh shape restores onto another (or onto one
device).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno as errno_lib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

SEAL_NAME = "integrity.json"
DAMAGED_DIR = "damaged"
FAULT_ENV = "RLAX_FAULT_KILL_IN_SAVE"
_FAULT_PHASES = ("arrays", "commit", "seal")
_TMP_MARKER = ".orbax-checkpoint-tmp"


class DamagedCheckpointError(RuntimeError):
  """A checkpoint's files do not match its seal or cannot be read."""


class CheckpointWriteError(OSError):
  """A save failed; the previous checkpoints are untouched."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
  """Paths (relative to `step_dir`, sorted) of every file but the seal.

  The seal's temporary file (left by a kill while sealing) is not part of
  the checkpoint either.
  """
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in (SEAL_NAME, SEAL_NAME + ".tmp"):
        out.append(rel)
  return sorted(out)


def _hash_files(step_dir: str, rels: list[str]) -> dict[str, str]:
  """rel -> SHA-256, hashed on a few threads (hashlib releases the GIL)."""
  workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    digests = pool.map(lambda r: _sha256(os.path.join(step_dir, r)), rels)
    return dict(zip(rels, digests))


def _fault_phase(step: int) -> str | None:
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return None
  at, _, phase = spec.partition(":")
  phase = phase or "arrays"
  if phase not in _FAULT_PHASES or not at.strip().isdigit():
    raise ValueError(f"{FAULT_ENV}={spec!r}: use <step>:<phase> with phase "
                     f"one of {_FAULT_PHASES}, or unset it.")
  return phase if int(at) == step else None


def _kill_self() -> None:
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_when_arrays_appear(directory: str, step: int,
                             stop: threading.Event) -> None:
  """Fault injection: SIGKILL once an array file of `step` is half-way."""
  prefix = f"{step}{_TMP_MARKER}"
  while not stop.is_set():
    try:
      tmps = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
      tmps = []
    for name in tmps:
      for root, _, files in os.walk(os.path.join(directory, name, "state")):
        if files and os.path.basename(root) == "d":  # array data files
          _kill_self()
    time.sleep(0.0005)


@contextlib.contextmanager
def _kill_before_commit(directory: str, step: int):
  """Fault injection: SIGKILL when the save renames `step`'s temporary
  directory into place (the end of the `arrays` phase, whatever the
  watcher thread saw). Patches `os.rename` while entered."""
  prefix = os.path.join(directory, f"{step}{_TMP_MARKER}")
  real = os.rename

  def rename(src, dst, *args, **kwargs):
    if os.fspath(src).startswith(prefix):
      _kill_self()
    return real(src, dst, *args, **kwargs)

  os.rename = rename
  try:
    yield
  finally:
    os.rename = real


class Checkpointer:
  """Saves and restores (TrainState, metadata) under `directory`.

  Args:
    directory: where step directories are written (created if missing).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            create=True, cleanup_tmp_directories=True))
    self._verified: set[int] = set()  # Steps checked by this instance.

  # -- paths -------------------------------------------------------------------
  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @property
  def damaged_dir(self) -> str:
    return os.path.join(self.directory, DAMAGED_DIR)

  def damaged(self) -> list[str]:
    """Names of the steps moved aside to `damaged_dir`, sorted."""
    if not os.path.isdir(self.damaged_dir):
      return []
    return sorted(os.listdir(self.damaged_dir))

  # -- listing -------------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest intact checkpoint's step, None if there is none.

    Damaged newer steps are moved aside (module docstring), each reported on
    stderr, and the fallback step is named there too.

    Raises:
      DamagedCheckpointError: if no intact step is left and at least one was
        moved aside (now or by an earlier run).
    """
    moved = []
    found = None
    for step in sorted(self.all_steps(), reverse=True):
      self._verified.discard(step)  # checked afresh: files change between runs
      problem = self._verify(step)
      if problem is None:
        found = step
        break
      moved.append(step)
      where = self._move_aside(step)
      _report(f"checkpoint step {step} under {self.directory} is damaged "
              f"({problem}); moved it to {where}.")
    if moved:
      self._sync("rlax_llm:checkpoint_moved")
      self._manager.reload()
    if found is not None:
      if moved:
        _report(f"falling back to checkpoint step {found}, the newest intact "
                f"one; the run goes on from there.")
      return found
    if self.damaged():
      raise DamagedCheckpointError(
          f"No intact checkpoint is left under {self.directory!r}: the "
          f"damaged ones were moved to {self.damaged_dir!r} "
          f"({', '.join(self.damaged())}). To start this run over, move "
          f"{self.damaged_dir!r} out of the way (it is kept for inspection) "
          "and re-run, or use a new --workdir.")
    return None

  def all_steps(self) -> list[int]:
    """Steps of every committed checkpoint, oldest first (unverified)."""
    return sorted(self._manager.all_steps())

  # -- save --------------------------------------------------------------------
  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes `state` and the JSON-able `meta` as checkpoint `step`, sealed.

    In a multi-process run every process must call it with the same step.

    Raises:
      CheckpointWriteError: if the write fails (e.g. ENOSPC); the checkpoints
        written before are left intact.
    """
    phase = _fault_phase(step)
    existed = os.path.isdir(self.step_dir(step))
    stop = threading.Event()
    if phase == "arrays":
      threading.Thread(target=_kill_when_arrays_appear,
                       args=(self.directory, step, stop), daemon=True).start()
    try:
      with (_kill_before_commit(self.directory, step) if phase == "arrays"
            else contextlib.nullcontext()):
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
      if phase in ("arrays", "commit"):
        _kill_self()
      self._seal(step, kill_before_rename=phase == "seal")
    except Exception as e:  # pylint: disable=broad-except
      stop.set()
      raise self._save_failed(step, e, existed) from e
    stop.set()
    self._verified.add(step)

  def _seal(self, step: int, *, kill_before_rename: bool = False) -> None:
    """Writes `<step>/integrity.json` (process 0), then a barrier."""
    if jax.process_index() == 0:
      step_dir = self.step_dir(step)
      rels = _step_files(step_dir)
      digests = _hash_files(step_dir, rels)
      seal = {"version": 1, "step": step, "algorithm": "sha256", "files": {
          r: {"size": os.path.getsize(os.path.join(step_dir, r)),
              "sha256": digests[r]} for r in rels}}
      path = os.path.join(step_dir, SEAL_NAME)
      with open(path + ".tmp", "w") as f:
        json.dump(seal, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
      if kill_before_rename:
        _kill_self()
      os.replace(path + ".tmp", path)
    self._sync(f"rlax_llm:checkpoint_seal_{step}")

  def _save_failed(self, step: int, e: BaseException,
                   existed: bool) -> CheckpointWriteError:
    """Cleans what the failed save of `step` left; the error to raise."""
    self._verified.discard(step)
    try:  # Orbax's writer threads may still be running: let them end first.
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    if jax.process_index() == 0:
      try:
        for name in os.listdir(self.directory):
          if name.startswith(f"{step}{_TMP_MARKER}"):
            shutil.rmtree(os.path.join(self.directory, name),
                          ignore_errors=True)
        if not existed and os.path.isdir(self.step_dir(step)):
          self._move_aside(step)  # committed, but its seal was not written
      except OSError:
        pass
    try:
      self._manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    intact = [s for s in self.all_steps() if s != step]
    kept = (f"the checkpoint of step {intact[-1]} is intact and a re-run of "
            f"the same command resumes from it" if intact else
            "no earlier checkpoint exists, so a re-run starts from the "
            "beginning")
    code = _errno(e)
    return CheckpointWriteError(
        code if code is not None else errno_lib.EIO,
        f"Could not write checkpoint step {step} under {self.directory!r} "
        f"({type(e).__name__}: {e}); the run stopped and {kept}. Fix the "
        "cause (free space on that disk, or pass a --workdir on a larger, "
        "writable one), then re-run.")

  # -- restore ------------------------------------------------------------------
  def restore(self, step: int, abstract_state: Any, shardings: Any):
    """Returns (state placed on `shardings`, meta) of checkpoint `step`.

    Args:
      step: a complete checkpoint's step.
      abstract_state: pytree of ShapeDtypeStructs (or arrays) of the state.
      shardings: matching pytree of shardings, on any mesh.

    Raises:
      FileNotFoundError: if there is no committed checkpoint `step`.
      DamagedCheckpointError: if its files do not match its seal.
    """
    self._check_step(step)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step` (errors as `restore`)."""
    self._check_step(step)
    out = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(out.meta)

  def _check_step(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(
          f"No complete checkpoint for step {step} under {self.directory!r}; "
          f"the complete ones are {steps}.")
    problem = self._verify(step)
    if problem is not None:
      raise DamagedCheckpointError(
          f"Checkpoint step {step} under {self.directory!r} is damaged "
          f"({problem}). Re-run the same command: `latest_step` moves it to "
          f"{self.damaged_dir!r} and resumes from the newest intact one.")

  # -- verification --------------------------------------------------------------
  def _verify(self, step: int) -> str | None:
    """None if `step` is intact, else what is wrong with it."""
    if step in self._verified:
      return None
    step_dir = self.step_dir(step)
    seal_path = os.path.join(step_dir, SEAL_NAME)
    seal = None
    if os.path.exists(seal_path):
      try:
        with open(seal_path) as f:
          seal = json.load(f)
        files = seal["files"]
        if not isinstance(files, dict) or not files:
          raise ValueError("no files listed")
      except (OSError, ValueError, KeyError, TypeError) as e:
        seal = None  # An unreadable seal: judge the files themselves.
        _report(f"the seal of checkpoint step {step} is unreadable "
                f"({type(e).__name__}); reading the checkpoint to check it.")
    problem = (self._read_fully(step) if seal is None
               else _compare(step_dir, seal["files"]))
    if problem is None:
      if seal is None:
        self._seal_quietly(step)
      self._verified.add(step)
    return problem

  def _read_fully(self, step: int) -> str | None:
    """Reads an unsealed step's metadata and every array to host memory."""
    step_dir = self.step_dir(step)
    try:
      for name in ("_CHECKPOINT_METADATA", os.path.join("meta", "metadata")):
        path = os.path.join(step_dir, name)
        if os.path.exists(path) or name != "_CHECKPOINT_METADATA":
          with open(path) as f:
            json.load(f)
      with ocp.PyTreeCheckpointer() as reader, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # host arrays need no sharding
        meta = reader.metadata(os.path.join(step_dir, "state"))
        tree = meta.item_metadata
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        reader.restore(os.path.join(step_dir, "state"),
                       args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # pylint: disable=broad-except
      return f"unsealed and unreadable: {type(e).__name__}: {str(e)[:300]}"
    return None

  def _seal_quietly(self, step: int) -> None:
    try:
      self._seal(step)
    except OSError:
      pass  # Read-only storage: the step stays usable, checked again later.

  def _move_aside(self, step: int) -> str:
    """Moves step `step` to `damaged/step_<step>[.k]`; returns the new path."""
    base = os.path.join(self.damaged_dir, f"step_{step}")
    dest, k = base, 0
    while os.path.exists(dest):
      k += 1
      dest = f"{base}.{k}"
    self._verified.discard(step)
    if jax.process_index() == 0:
      os.makedirs(self.damaged_dir, exist_ok=True)
      os.replace(self.step_dir(step), dest)
    return dest

  def _sync(self, name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(name)

  def close(self) -> None:
    self._manager.close()


def _compare(step_dir: str, files: dict[str, Any]) -> str | None:
  """What differs between `step_dir` and its seal's `files`, or None."""
  present = set(_step_files(step_dir))
  missing = sorted(set(files) - present)
  if missing:
    return f"missing file {missing[0]}" + (
        f" and {len(missing) - 1} more" if len(missing) > 1 else "")
  for rel, want in sorted(files.items()):
    size = os.path.getsize(os.path.join(step_dir, rel))
    if size != want["size"]:
      return f"{rel} has {size} bytes, the seal says {want['size']}"
  digests = _hash_files(step_dir, sorted(files))
  for rel, want in sorted(files.items()):
    if digests[rel] != want["sha256"]:
      return f"{rel} has changed since it was written (SHA-256 mismatch)"
  return None


def _errno(e: BaseException) -> int | None:
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    e = e.__cause__ or e.__context__
  return None


def _report(message: str) -> None:
  if jax.process_index() == 0:
    print(f"rlax_llm: {message}", file=sys.stderr, flush=True)
