"""Kill-and-resume: a run interrupted and resumed from its checkpoints has
exactly the loss curve (and final state) of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from attnlib import training
from tests.training import TOKENS
from tests.training import assert_same_state
from tests.training import setup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = dict(batch_size=4, seq_len=16, seed=5, log_every=1, progress=False)
LONG = 100_000  # the child's run length: it is killed long before the end


def _fit(steps, total_steps=12, **kwargs):
  model, optimizer, schedule = setup(0, total_steps=total_steps)
  history = training.fit(model, optimizer, TOKENS, steps=steps, lr_schedule=schedule,
                         **COMMON, **kwargs)
  return history, model, optimizer


def test_resume_in_process(tmp_path):
  full, full_model, full_optimizer = _fit(12, checkpoint_dir=tmp_path / "full",
                                          checkpoint_every=4, eval_tokens=TOKENS,
                                          eval_every=4)
  assert full.steps == list(range(12)) and full.eval_steps == [4, 8, 12]
  assert training.Checkpointer(tmp_path / "full").all_steps() == [4, 8, 12]

  # A run that stops after 6 steps; its model and optimizer are dropped.
  first, _, _ = _fit(6, checkpoint_dir=tmp_path / "run", checkpoint_every=4)
  assert first.loss == full.loss[:6]
  assert training.Checkpointer(tmp_path / "run").all_steps() == [4, 6]
  shutil.copytree(tmp_path / "run", tmp_path / "run_at_4")
  shutil.rmtree(tmp_path / "run_at_4" / "6")  # as if killed between steps 4 and 6

  # Fresh model and optimizer (other init) resumed from the directory; the
  # checkpoint's data seed wins over a different seed= argument.
  for directory, start, seed in (("run", 6, 5), ("run_at_4", 4, 99)):
    model, optimizer, schedule = setup(3, total_steps=12)
    second = training.fit(model, optimizer, TOKENS, steps=12, lr_schedule=schedule,
                          checkpoint_dir=tmp_path / directory, checkpoint_every=4,
                          **dict(COMMON, seed=seed))
    assert second.resumed and second.start_step == start
    assert second.steps == list(range(start, 12))
    assert second.loss == full.loss[start:]  # exactly
    assert second.lr == full.lr[start:]
    # (TinyLM counts its calls, the full run's evaluations included.)
    assert_same_state(model, full_model, ignore=("['calls']",))
    assert int(model.calls[...]) == 12 and int(full_model.calls[...]) == 12 + 3 * 8
    assert_same_state(optimizer, full_optimizer)
  # Resuming a finished run does nothing.
  model, optimizer, _ = setup(3, total_steps=12)
  done = training.fit(model, optimizer, TOKENS, steps=12, checkpoint_dir=tmp_path / "run",
                      **COMMON)
  assert done.resumed and done.start_step == 12 and done.steps == []
  # resume=False ignores the checkpoints.
  model, optimizer, _ = setup(0, total_steps=12)
  again = training.fit(model, optimizer, TOKENS, steps=3, checkpoint_dir=tmp_path / "run",
                       resume=False, **COMMON)
  assert not again.resumed and again.loss == full.loss[:3]


def run_child(checkpoint_dir):
  """The killed run (in a child process): LONG steps, checkpoints every 4."""
  model, optimizer, _ = setup(0, total_steps=LONG)
  training.fit(model, optimizer, TOKENS, steps=LONG, checkpoint_dir=checkpoint_dir,
               checkpoint_every=4, keep_checkpoints=2, **COMMON)


def _finished_steps(directory):
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_resume_after_sigkill(tmp_path):
  directory = tmp_path / "ckpt"
  log = open(tmp_path / "child.log", "wb")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  child = subprocess.Popen(
      [sys.executable, "-c", "import sys; from tests.training.test_resume import run_child; "
       "run_child(sys.argv[1])", str(directory)],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while not _finished_steps(directory):
      assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint after 120 s"
      time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
  finally:
    if child.poll() is None:
      child.kill()
    child.wait()
    log.close()
  assert child.returncode == -signal.SIGKILL

  saved = training.Checkpointer(directory).all_steps()
  assert saved and saved[-1] % 4 == 0 and saved[-1] < LONG
  start = saved[-1]
  model, optimizer, _ = setup(3, total_steps=LONG)
  resumed = training.fit(model, optimizer, TOKENS, steps=start + 6, checkpoint_dir=directory,
                         checkpoint_every=4, **COMMON)
  assert resumed.resumed and resumed.start_step == start

  reference, reference_model, reference_optimizer = _fit(start + 6, total_steps=LONG)
  assert resumed.loss == reference.loss[start:]  # exactly
  assert_same_state(model, reference_model)
  assert_same_state(optimizer, reference_optimizer)
