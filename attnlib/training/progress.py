"""A small console progress bar (no dependency): on a terminal it redraws one
line in place with ``\\r``; elsewhere (a file, a pipe, a CI log) it draws
nothing and the training loop's absl log lines are the record."""

from __future__ import annotations

import shutil
import sys
import time


def format_duration(seconds: float) -> str:
  """``H:MM:SS`` (``?`` when unknown)."""
  if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_metric(name: str, value) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
      return f"{name} {value:.2e}"
    return f"{name} {value:.4f}"
  return f"{name} {value}"


class ProgressBar:
  """``bar = ProgressBar(total); bar.update(n, loss=..., lr=...); bar.close()``.

  A line reads ``step 37/100 [#######.............]  37% loss 2.3456 lr
  3.00e-04 | 0:00:04<0:00:07`` (elapsed < estimated time left). ``initial``
  is the step the run started from (a resumed run), so the rate and the
  estimate count only this run's steps. ``enabled`` defaults to
  ``stream.isatty()``; a disabled bar writes nothing. Redraws are throttled
  to one per ``min_interval`` seconds, except the last step's.
  """

  def __init__(self, total: int, *, initial: int = 0, stream=None, width: int = 20,
               enabled: bool | None = None, min_interval: float = 0.1,
               desc: str = "step", clock=time.monotonic):
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
      raise ValueError(f"ProgressBar: total={total!r} must be an int >= 1")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
      raise ValueError(f"ProgressBar: width={width!r} must be an int >= 1")
    self.total, self.initial, self.n = total, initial, initial
    self.stream = sys.stderr if stream is None else stream
    if enabled is None:
      isatty = getattr(self.stream, "isatty", None)
      enabled = bool(isatty and isatty())
    self.enabled, self.width, self.desc = enabled, width, desc
    self.min_interval, self.clock = min_interval, clock
    self.start_time = clock()
    self.metrics: dict = {}
    self._last_draw = None
    self._last_len = 0

  def format(self, n: int | None = None, **metrics) -> str:
    """The bar's line for step ``n`` (without ``\\r``)."""
    n = self.n if n is None else n
    frac = min(max(n / self.total, 0.0), 1.0)
    filled = int(frac * self.width)
    bar = "#" * filled + "." * (self.width - filled)
    parts = [f"{self.desc} {n}/{self.total} [{bar}] {int(frac * 100):3d}%"]
    parts += [format_metric(k, v) for k, v in (metrics or self.metrics).items()]
    elapsed = self.clock() - self.start_time
    done = n - self.initial
    eta = elapsed / done * (self.total - n) if done > 0 else None
    parts.append(f"| {format_duration(elapsed)}<{format_duration(eta)}")
    return " ".join(parts)

  def update(self, n: int, **metrics) -> None:
    """Moves the bar to step ``n``; given metrics replace the shown ones."""
    self.n = n
    if metrics:
      self.metrics = dict(metrics)
    now = self.clock()
    if (self._last_draw is not None and now - self._last_draw < self.min_interval
        and n < self.total):
      return
    self.draw()

  def draw(self) -> None:
    if not self.enabled:
      return
    line = self.format()
    columns = shutil.get_terminal_size((120, 24)).columns
    line = line[:max(columns - 1, 10)]
    pad = " " * max(self._last_len - len(line), 0)
    self.stream.write("\r" + line + pad)
    self.stream.flush()
    self._last_len = len(line)
    self._last_draw = self.clock()

  def clear(self) -> None:
    """Blanks the bar's line (call before printing a log line over it)."""
    if self.enabled and self._last_len:
      self.stream.write("\r" + " " * self._last_len + "\r")
      self.stream.flush()
      self._last_len = 0

  def close(self) -> None:
    """Draws the final state and ends the line."""
    if self.enabled:
      self.draw()
      self.stream.write("\n")
      self.stream.flush()
      self._last_len = 0
