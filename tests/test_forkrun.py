"""The suite's fork server behaves like `subprocess` for the commands it runs."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_code_output_status_env_and_cwd(forks, tmp_path):
  code = textwrap.dedent("""
      import os, sys
      print("out", sys.argv[1:], os.getcwd(), os.environ["PROBE"])
      print("err", file=sys.stderr)
      sys.exit(3)
  """)
  proc = forks.run([sys.executable, "-c", code, "a", "b"], cwd=str(tmp_path),
                   env=dict(os.environ, PROBE="x"), timeout=60)
  assert proc.returncode == 3
  assert proc.stdout == f"out ['a', 'b'] {tmp_path} x\n"
  assert proc.stderr == "err\n"
  want = subprocess.run([sys.executable, "-c", code, "a", "b"],
                        cwd=str(tmp_path), env=dict(os.environ, PROBE="x"),
                        capture_output=True, text=True, check=False)
  assert (want.returncode, want.stdout, want.stderr) == (
      proc.returncode, proc.stdout, proc.stderr)


def test_module_script_and_an_uncaught_error(forks, tmp_path):
  script = tmp_path / "s.py"
  script.write_text("import sys\nprint(__name__, sys.argv[1:])\n"
                    "raise ValueError('boom')\n")
  proc = forks.run([sys.executable, str(script), "z"], cwd=REPO, timeout=60)
  assert proc.returncode == 1 and proc.stdout == "__main__ ['z']\n"
  assert "ValueError: boom" in proc.stderr and "Traceback" in proc.stderr
  proc = forks.run([sys.executable, "-m", "json.tool", "--help"], cwd=REPO,
                   timeout=60)
  assert proc.returncode == 0 and "usage:" in proc.stdout


def test_kill_and_timeout(forks):
  child = forks.popen([sys.executable, "-c", "import time; time.sleep(60)"],
                      cwd=REPO)
  assert child.poll() is None
  child.send_signal(signal.SIGKILL)
  assert child.wait(timeout=30) == -signal.SIGKILL
  with pytest.raises(subprocess.TimeoutExpired):
    forks.run([sys.executable, "-c", "import time; time.sleep(60)"],
              cwd=REPO, timeout=0.5)


def test_jax_environment_changes_are_refused(forks):
  # jax read its JAX_* variables when the server imported it.
  with pytest.raises(ValueError, match="JAX_PROBE_OF_THE_SUITE.*subprocess"):
    forks.run([sys.executable, "-c", "pass"], cwd=REPO,
              env=dict(os.environ, JAX_PROBE_OF_THE_SUITE="1"))
  with pytest.raises(ValueError, match="Forks only"):
    forks.run(["python3", "-c", "pass"], cwd=REPO)


def test_a_child_still_chooses_its_devices(forks):
  code = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + " --xla_force_host_platform_device_count=3")
      import jax
      print(len(jax.devices()))
  """)
  proc = forks.run([sys.executable, "-c", code], cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "3"
