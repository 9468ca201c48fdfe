"""``fit``: the training loop (jitted steps, periodic evaluation and
checkpoints, resume, absl metric logs and a console progress bar).

Steps are counted by the optimizer: ``optimizer.step`` is the number of
updates done. Training step ``s`` (0-based) draws ``batch_at(train_tokens, s,
batch_size, seq_len, seed)``, records the loss of the current parameters on
it as ``loss`` at ``s``, and makes update ``s + 1``. A checkpoint "at step n"
holds the state after ``n`` updates, and a run resumed from it continues with
training step ``n``, on the same batch an uninterrupted run would have drawn:
killing and resuming a run reproduces the uninterrupted loss curve exactly
(same device and XLA build).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from attnlib.data import text
from attnlib.training import checkpoint as checkpoint_lib
from attnlib.training import progress as progress_lib
from attnlib.training import steps as steps_lib


@dataclasses.dataclass
class History:
  """What ``fit`` ran: ``loss[i]`` (and ``lr[i]``, the learning rate of the
  update that followed, when ``fit`` got an ``lr_schedule``) belong to
  training step ``steps[i]``; ``eval_loss[i]`` to the parameters after
  ``eval_steps[i]`` updates. ``start_step`` is where this call began (the
  restored checkpoint's step on a resume), ``resumed`` whether it restored."""
  start_step: int = 0
  resumed: bool = False
  steps: list[int] = dataclasses.field(default_factory=list)
  loss: list[float] = dataclasses.field(default_factory=list)
  lr: list[float] = dataclasses.field(default_factory=list)
  eval_steps: list[int] = dataclasses.field(default_factory=list)
  eval_loss: list[float] = dataclasses.field(default_factory=list)
  tokens_per_second: float = 0.0


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"fit: {name}={value!r} must be an int >= {minimum}")
  return int(value)


def fit(model: nnx.Module, optimizer: nnx.Optimizer, train_tokens, *, steps: int,
        batch_size: int, seq_len: int, seed: int = 0, eval_tokens=None,
        eval_every: int = 0, eval_batches: int = 8, checkpoint_dir=None,
        checkpoint_every: int = 0, keep_checkpoints: int = 3, resume: bool = True,
        lr_schedule: Callable | None = None, log_every: int = 10,
        progress: bool = True, progress_stream=None,
        loss_fn: steps_lib.LossFn = steps_lib.lm_loss) -> History:
  """Trains ``model`` (in place) until ``optimizer.step == steps``.

  Args:
    model: any ``nnx.Module`` mapping int32 tokens [B, T] to logits [B, T, V].
    optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (e.g. ``tx =
      make_optimizer(...)``); its step counter says where training stands, so
      calling ``fit`` again with more ``steps`` continues.
    train_tokens: 1-D int tokens (``attnlib.data``), sampled by ``batch_at``.
    steps: the total number of updates to reach (not the number to add).
    batch_size, seq_len, seed: the ``batch_at`` arguments. On a resume the
      checkpoint's seed wins (a warning says so if they differ).
    eval_tokens: held-out tokens; when given, ``evaluate`` (``eval_batches``
      fixed batches) runs every ``eval_every`` updates (0: only at the end)
      and at the end.
    checkpoint_dir: when given, a ``Checkpointer`` saves every
      ``checkpoint_every`` updates (0: only at the end) and at the end,
      keeping ``keep_checkpoints``; with ``resume``, the latest checkpoint in
      the directory is restored first if it is ahead of ``optimizer.step``.
    lr_schedule: the optimizer's schedule (``make_schedule(...)`` with the
      same arguments), only for logging the learning rate.
    log_every: absl ``logging.info`` of step, loss, lr and tokens/s every so
      many updates (and at the end).
    progress: show a ``ProgressBar`` on ``progress_stream`` (default stderr)
      when that is a terminal.
    loss_fn: ``loss_fn(model, inputs, targets) -> scalar``; default ``lm_loss``.

  Returns:
    the ``History`` of this call.
  """
  steps = _check_int("steps", steps, 1)
  batch_size = _check_int("batch_size", batch_size, 1)
  seq_len = _check_int("seq_len", seq_len, 1)
  seed = _check_int("seed", seed, 0)
  eval_every = _check_int("eval_every", eval_every, 0)
  eval_batches = _check_int("eval_batches", eval_batches, 1)
  checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 0)
  log_every = _check_int("log_every", log_every, 1)
  train_tokens = np.asarray(train_tokens)
  text.batch_at(train_tokens, 0, 1, seq_len, seed)  # validates tokens and seq_len
  if eval_tokens is not None:
    eval_tokens = np.asarray(eval_tokens)
    text.batch_at(eval_tokens, 0, 1, seq_len, seed)

  history = History()
  ckpt = None
  if checkpoint_dir is not None:
    ckpt = checkpoint_lib.Checkpointer(checkpoint_dir, keep=keep_checkpoints)
  try:
    start = int(optimizer.step[...])
    if ckpt is not None and resume:
      latest = ckpt.latest_step()
      if latest is not None and latest > start:
        meta = ckpt.restore(model, optimizer, step=latest)
        start = int(optimizer.step[...])
        if start != latest:
          raise ValueError(f"fit: checkpoint {latest} in {ckpt.directory} holds an optimizer "
                           f"at step {start}")
        saved_seed = meta.get("seed", seed)
        if saved_seed != seed:
          logging.warning("fit: resuming with the checkpoint's data seed %d, not seed=%d",
                          saved_seed, seed)
          seed = saved_seed
        history.resumed = True
        logging.info("fit: resumed from the checkpoint at step %d in %s", latest,
                     ckpt.directory)
    elif ckpt is not None and ckpt.latest_step() is not None:
      logging.warning("fit: resume=False, but %s holds checkpoints %s (of another run?); "
                      "steps that exist there are not saved again", ckpt.directory,
                      ckpt.all_steps())
    history.start_step = start
    if start >= steps:
      logging.info("fit: optimizer.step=%d already reaches steps=%d", start, steps)
      return history

    train_step = steps_lib.make_train_step(loss_fn)
    eval_step = steps_lib.make_eval_step(loss_fn)
    bar = progress_lib.ProgressBar(steps, initial=start, stream=progress_stream,
                                   enabled=None if progress else False)

    def log(msg, *args):
      bar.clear()
      logging.info(msg, *args)
      bar.draw()

    def run_eval(n):
      loss = steps_lib.evaluate(model, eval_tokens, batch_size=batch_size, seq_len=seq_len,
                                num_batches=eval_batches, seed=seed, step_fn=eval_step)
      history.eval_steps.append(n)
      history.eval_loss.append(loss)
      log("step %d/%d eval_loss %.4f", n, steps, loss)

    pending = []  # device losses not yet fetched (fetching syncs the device)
    t_log, n_log, t_start = time.perf_counter(), start, time.perf_counter()
    for s in range(start, steps):
      inputs, targets = text.batch_at(train_tokens, s, batch_size, seq_len, seed)
      pending.append(train_step(model, optimizer, inputs, targets))
      history.steps.append(s)
      if lr_schedule is not None:
        history.lr.append(float(lr_schedule(s)))
      n = s + 1
      is_last = n == steps
      if n % log_every == 0 or is_last:
        history.loss.extend(float(x) for x in jax.device_get(pending))
        pending = []
        now = time.perf_counter()
        tok_s = (n - n_log) * batch_size * seq_len / max(now - t_log, 1e-9)
        t_log, n_log = now, n
        lr_text = f" lr {history.lr[-1]:.3e}" if history.lr else ""
        log("step %d/%d loss %.4f%s tokens/s %.0f", n, steps, history.loss[-1], lr_text,
            tok_s)
        shown = {"loss": history.loss[-1]}
        if history.lr:
          shown["lr"] = history.lr[-1]
        shown["tok/s"] = int(round(tok_s))
        bar.metrics = shown
      if eval_tokens is not None and ((eval_every and n % eval_every == 0) or is_last):
        run_eval(n)
      if ckpt is not None and ((checkpoint_every and n % checkpoint_every == 0) or is_last):
        ckpt.save(n, model, optimizer, metadata={"seed": seed})
      bar.update(n)
    elapsed = time.perf_counter() - t_start
    history.tokens_per_second = (steps - start) * batch_size * seq_len / max(elapsed, 1e-9)
    bar.close()
    return history
  finally:
    if ckpt is not None:
      ckpt.close()
