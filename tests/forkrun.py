"""Python commands run in processes forked from one that imported them.

The tests that drive `experiments.train` as a command (kills, damaged
checkpoints, resumes) or run a script on fake devices start dozens of short
processes; a fresh interpreter spends about 2.5 s of each importing jax,
flax, orbax and the project. A `ForkServer` is one helper process that
imports them once (without starting a JAX backend: no XLA threads exist yet,
so forking is safe, and a script may still set XLA_FLAGS, such as a fake
device count, before its first JAX operation) and forks a child for each
`python -m MODULE ...`, `python -c CODE ...` or `python SCRIPT ...`. A
child is a real process of its own: it gets the command's argv, working
directory and environment, writes its stdout and stderr to files, can be
SIGKILLed, and exits with the command's status (atexit handlers and
non-daemon threads run as at a normal interpreter exit).

What a child shares with the server, unlike a fresh interpreter: the modules
imported before the fork, and so the environment variables JAX reads at
import (a command whose JAX_* variables differ from the server's is refused:
run it with `subprocess`), and Python's string-hash seed.

The protocol is one JSON line per request on the server's stdin and one per
reply on its stdout: {"op": "spawn", argv, cwd, env, stdout, stderr} ->
{"pid"}, and {"op": "poll", pid} -> {"status": None | returncode}, with the
returncode of `subprocess` (-N for a signal N).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Optional, Sequence

_SERVER = textwrap.dedent("""
    import importlib, json, os, runpy, signal, sys
    # Replies go to the pipe the client reads; anything printed goes to stderr.
    requests, replies = sys.stdin, os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in sys.argv[1:]:
      importlib.import_module(name)
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      sys.exit(f"Importing {sys.argv[1:]} started a JAX backend: forking "
               "it is unsafe.")
    children = set()

    def child(req):
      os.setpgrp()  # a kill of the child's group reaches no one else
      null = os.open(os.devnull, os.O_RDONLY)
      os.dup2(null, 0)
      for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                fd)
      os.chdir(req["cwd"])
      os.environ.clear()
      os.environ.update(req["env"])
      if req["cwd"] not in sys.path:
        sys.path.insert(0, req["cwd"])
      argv = req["argv"]
      if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
      elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
      else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")

    for line in requests:
      req = json.loads(line)
      if req["op"] == "spawn":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
          requests = replies = None
          sys.stdin = open(os.devnull)
          child(req)  # SystemExit and errors end the child as usual
          sys.exit(0)
        children.add(pid)
        reply = {"pid": pid}
      else:
        got, status = os.waitpid(req["pid"], os.WNOHANG)
        reply = {"status": None}
        if got:
          children.discard(got)
          reply["status"] = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                             else os.WEXITSTATUS(status))
      replies.write(json.dumps(reply) + "\\n")
      replies.flush()
    for pid in children:  # the tests stopped: no orphaned runs
      try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
      except OSError:
        pass
""")


class Child:
  """A forked command: the parts of `subprocess.Popen` the tests use."""

  def __init__(self, server: "ForkServer", pid: int, out: str, err: str):
    self._server, self.pid, self._out, self._err = server, pid, out, err
    self.returncode: Optional[int] = None

  def poll(self) -> Optional[int]:
    if self.returncode is None:
      reply = self._server._request(op="poll", pid=self.pid)  # pylint: disable=protected-access
      self.returncode = reply["status"]
    return self.returncode

  def wait(self, timeout: Optional[float] = None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while self.poll() is None:
      if deadline is not None and time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(["forked", self.pid], timeout)
      time.sleep(delay)
      delay = min(2 * delay, 0.05)
    return self.returncode

  def send_signal(self, sig: int) -> None:
    if self.returncode is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def output(self) -> tuple[str, str]:
    """(stdout, stderr) the command wrote."""
    out = []
    for path in (self._out, self._err):
      with open(path, encoding="utf-8", errors="replace") as f:
        out.append(f.read())
      os.remove(path)
    return tuple(out)


class ForkServer:
  """Forks `python -m MODULE ...` / `python -c CODE ...` commands from one
  process that imported `preload` (module docstring)."""

  def __init__(self, preload: Sequence[str], *, cwd: str):
    self._env = dict(os.environ)
    self._tmp = tempfile.mkdtemp(prefix="rlax_llm_forkrun_")
    self._proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, *preload], cwd=cwd, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env)
    self._count = 0

  def _request(self, **req) -> dict:
    self._proc.stdin.write(json.dumps(req) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"The fork server exited ({self._proc.poll()}); its "
                         "stderr is in the test's captured output.")
    return json.loads(line)

  def popen(self, argv: Sequence[str], *, cwd: str,
            env: Optional[dict] = None) -> Child:
    """Starts `argv`: `[sys.executable, "-m" | "-c", target, args...]` or
    `[sys.executable, script, args...]`."""
    if argv[0] != sys.executable or (argv[1].startswith("-")
                                     and argv[1] not in ("-m", "-c")):
      raise ValueError(f"Forks only `{sys.executable} -m|-c|SCRIPT ...`, not "
                       f"{argv}.")
    env = dict(self._env if env is None else env)
    jax_vars = {k for k in set(env) | set(self._env) if k.startswith("JAX_")}
    changed = sorted(k for k in jax_vars if env.get(k) != self._env.get(k))
    if changed:
      raise ValueError(f"{changed} differ from the fork server's environment "
                       "and are read when jax is imported; run this command "
                       "with subprocess.")
    self._count += 1
    out, err = (os.path.join(self._tmp, f"{self._count}.{s}")
                for s in ("out", "err"))
    pid = self._request(op="spawn", argv=list(argv[1:]), cwd=cwd, env=env,
                        stdout=out, stderr=err)["pid"]
    return Child(self, pid, out, err)

  def run(self, argv: Sequence[str], *, cwd: str, env: Optional[dict] = None,
          timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """Like `subprocess.run(argv, capture_output=True, text=True)`."""
    child = self.popen(argv, cwd=cwd, env=env)
    try:
      child.wait(timeout)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
      raise
    out, err = child.output()
    return subprocess.CompletedProcess(list(argv), child.returncode, out, err)

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
    shutil.rmtree(self._tmp)
