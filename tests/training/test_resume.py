"""Kill-and-resume: SIGKILL a run after its first checkpoint, rerun it, get the same parameters.

Two ``python -m experiments.main`` runs of the tiny test config start side by side: one runs to
the end, the other is killed (SIGKILL, no chance to clean up) as soon as a checkpoint exists,
then started again with the same command and workdir. The final parameters and optimizer
state of both must be equal bit for bit (CPU, same seeds, same data order).
Marked slow: run it with ``--run-slow``.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 150


def _command(workdir):
  return [sys.executable, "-m", "experiments.main",
          "--config=experiments/configs/selective_copying.py:test",
          f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=10",
          "--config.eval_every_steps=1000", f"--workdir={workdir}"]


def _start(workdir, log):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(_command(workdir), cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def _checkpoints(workdir):
  path = os.path.join(workdir, "mamba_s6", "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def _state(workdir):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "mamba_s6", "checkpoints", str(STEPS), "state"))


# Three processes that each compile the model: about 35 s of 2 idle cores.
def test_killed_run_resumes_to_identical_parameters(tmp_path):
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  with open(tmp_path / "whole.log", "wb") as log_a, open(tmp_path / "killed.log", "wb") as log_b:
    run_a = _start(whole, log_a)
    run_b = _start(killed, log_b)
    deadline = time.time() + 300
    while not _checkpoints(killed):
      assert run_b.poll() is None, "the run to kill ended before its first checkpoint"
      assert time.time() < deadline, "no checkpoint after 300 s"
      time.sleep(0.02)
    os.kill(run_b.pid, signal.SIGKILL)
    run_b.wait()
    saved = _checkpoints(killed)
    assert run_b.returncode == -signal.SIGKILL and saved and max(saved) < STEPS, saved
    assert not os.path.exists(os.path.join(killed, "results.json"))
    run_b = _start(killed, log_b)
    assert run_b.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()
    assert run_a.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()
  a, b = _state(whole), _state(killed)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 5
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert (tmp_path / "killed" / "results.md").read_text() == (
      tmp_path / "whole" / "results.md").read_text()
