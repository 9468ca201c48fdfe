"""Tests for attnlib.training.progress.ProgressBar and fit's console output."""

from __future__ import annotations

import io

import pytest

from attnlib import training
from attnlib.training import progress
from tests.training import TOKENS
from tests.training import setup


class _Tty(io.StringIO):
  def isatty(self):
    return True


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_format():
  clock = _Clock()
  bar = training.ProgressBar(10, stream=_Tty(), clock=clock)
  clock.t += 3.0
  line = bar.format(3, loss=2.5, lr=3e-4, **{"tok/s": 12345})
  assert line == ("step 3/10 [######..............]  30% loss 2.5000 lr 3.00e-04 "
                  "tok/s 12345 | 0:00:03<0:00:07")
  assert bar.format(0) == "step 0/10 [....................]   0% | 0:00:03<?"
  assert bar.format(10).startswith("step 10/10 [####################] 100% |")
  # A resumed run (initial=4): the estimate counts only this run's steps.
  resumed = training.ProgressBar(10, initial=4, width=10, stream=_Tty(), clock=clock)
  clock.t += 2.0
  assert resumed.format(6) == "step 6/10 [######....]  60% | 0:00:02<0:00:04"


def test_format_helpers():
  assert progress.format_duration(3725.4) == "1:02:05"
  assert progress.format_duration(None) == "?"
  assert progress.format_metric("loss", 1.23456) == "loss 1.2346"
  assert progress.format_metric("x", 1e-5) == "x 1.00e-05"
  assert progress.format_metric("n", 3) == "n 3"


def test_tty_output():
  stream, clock = _Tty(), _Clock()
  bar = training.ProgressBar(4, stream=stream, width=4, min_interval=0.0, clock=clock)
  bar.update(1, loss=1.5)
  bar.update(2)
  assert stream.getvalue() == ("\rstep 1/4 [#...]  25% loss 1.5000 | 0:00:00<0:00:00"
                               "\rstep 2/4 [##..]  50% loss 1.5000 | 0:00:00<0:00:00")
  stream.truncate(0), stream.seek(0)
  bar.clear()
  line = "step 2/4 [##..]  50% loss 1.5000 | 0:00:00<0:00:00"
  assert stream.getvalue() == "\r" + " " * len(line) + "\r"
  stream.truncate(0), stream.seek(0)
  bar.update(4, loss=0.5)
  bar.close()
  assert stream.getvalue() == ("\rstep 4/4 [####] 100% loss 0.5000 | 0:00:00<0:00:00" * 2
                               + "\n")


def test_shorter_line_overwrites_longer():
  stream = _Tty()
  bar = training.ProgressBar(4, stream=stream, width=4, min_interval=0.0, clock=_Clock())
  bar.update(1, loss=1.5, extra="a long metric value")
  stream.truncate(0), stream.seek(0)
  bar.update(2, loss=1.5)
  line = "step 2/4 [##..]  50% loss 1.5000 | 0:00:00<0:00:00"
  assert stream.getvalue() == "\r" + line + " " * len(" extra a long metric value")


def test_throttled():
  stream, clock = _Tty(), _Clock()
  bar = training.ProgressBar(100, stream=stream, min_interval=1.0, clock=clock)
  bar.update(1)
  bar.update(2)  # within the interval: not drawn
  assert stream.getvalue().count("\r") == 1
  clock.t += 1.5
  bar.update(3)
  bar.update(100)  # the last step is always drawn
  assert stream.getvalue().count("\r") == 3 and "step 100/100" in stream.getvalue()


def test_not_a_tty_writes_nothing():
  stream = io.StringIO()
  bar = training.ProgressBar(5, stream=stream)
  assert not bar.enabled
  bar.update(3, loss=1.0)
  bar.clear()
  bar.close()
  assert stream.getvalue() == ""
  assert not training.ProgressBar(5, stream=_Tty(), enabled=False).enabled


def test_rejects():
  with pytest.raises(ValueError, match="total=0"):
    training.ProgressBar(0)
  with pytest.raises(ValueError, match="width=0"):
    training.ProgressBar(3, width=0)


def test_fit_draws_bar_on_tty():
  stream = _Tty()
  model, optimizer, schedule = setup(0, total_steps=6)
  training.fit(model, optimizer, TOKENS, steps=6, batch_size=2, seq_len=8, log_every=2,
               lr_schedule=schedule, progress_stream=stream)
  out = stream.getvalue()
  assert out.startswith("\rstep ") and out.endswith("\n")
  last = out.rstrip("\n").split("\r")[-1]
  assert last.startswith("step 6/6 [####################] 100% loss ")
  assert " lr " in last and " tok/s " in last
  quiet = io.StringIO()
  model, optimizer, _ = setup(0, total_steps=6)
  training.fit(model, optimizer, TOKENS, steps=2, batch_size=2, seq_len=8,
               progress_stream=quiet)
  assert quiet.getvalue() == ""
