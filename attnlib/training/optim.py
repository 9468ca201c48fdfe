"""The optimizer: AdamW with linear warmup and cosine decay, global-norm
gradient clipping, and weight decay only on matrices (not on biases, norm
scales or any other 0-/1-D parameter)."""

from __future__ import annotations

import functools
import math

import jax
import optax

# Parameter names never decayed, whatever their rank (norm scales and biases).
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def _key_name(entry) -> str | None:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return None


def _leaf_name(path) -> str:
  """The last path entry that names a parameter (skipping nnx's `.value`)."""
  names = [_key_name(entry) for entry in path]
  names = [n for n in names if n is not None and n != "value"]
  return names[-1] if names else ""


def decays(path, param) -> bool:
  """Whether the parameter at ``path`` is weight-decayed: it has rank >= 2 and
  its name is not in ``NO_DECAY_NAMES`` (nor ends in ``_bias``/``_scale``)."""
  name = _leaf_name(path)
  if name in NO_DECAY_NAMES or name.endswith(("_bias", "_scale")):
    return False
  return getattr(param, "ndim", 0) >= 2


def weight_decay_mask(params):
  """A pytree of bools like ``params`` (an ``nnx.State`` or a plain pytree of
  arrays): True where ``decays``. Given to ``optax.adamw(mask=...)``."""
  return jax.tree_util.tree_map_with_path(decays, params)


def _check_positive(fn, name, value, *, allow_zero=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{fn}: {name}={value!r} must be a finite number {bound}")


@functools.lru_cache(maxsize=64)
def make_schedule(learning_rate: float, *, warmup_steps: int, total_steps: int,
                  end_lr_fraction: float = 0.1) -> optax.Schedule:
  """``optax.warmup_cosine_decay_schedule``: 0 -> ``learning_rate`` linearly over
  ``warmup_steps``, then a cosine down to ``end_lr_fraction * learning_rate``
  at ``total_steps`` (counted from step 0, warmup included), constant after.
  The schedule maps the number of updates done so far to the learning rate of
  the next one (so the very first update has learning rate 0)."""
  fn = "make_schedule"
  _check_positive(fn, "learning_rate", learning_rate)
  if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"{fn}: warmup_steps={warmup_steps!r} must be an int >= 0")
  if (isinstance(total_steps, bool) or not isinstance(total_steps, int)
      or total_steps <= warmup_steps):
    raise ValueError(f"{fn}: total_steps={total_steps!r} must be an int > warmup_steps="
                     f"{warmup_steps}")
  if (isinstance(end_lr_fraction, bool) or not isinstance(end_lr_fraction, (int, float))
      or not 0.0 <= end_lr_fraction <= 1.0):
    raise ValueError(f"{fn}: end_lr_fraction={end_lr_fraction!r} must lie in [0, 1]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=learning_rate * end_lr_fraction)


@functools.lru_cache(maxsize=64)
def make_optimizer(learning_rate: float, *, warmup_steps: int, total_steps: int,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, grad_clip: float | None = 1.0,
                   end_lr_fraction: float = 0.1) -> optax.GradientTransformation:
  """``clip_by_global_norm(grad_clip)`` (skipped when None or 0) followed by
  ``optax.adamw`` on the ``make_schedule`` learning rate, with decoupled weight
  decay masked by ``weight_decay_mask``. Wrap it as
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Memoized (as is ``make_schedule``): equal arguments give the same
  transformation object. ``nnx.Optimizer`` keeps ``tx`` as a static part of
  its graph, so an optimizer rebuilt with a new but equal ``tx`` (a resume, a
  second run in one process) would otherwise recompile the ``nnx.jit`` train
  step."""
  fn = "make_optimizer"
  schedule = make_schedule(learning_rate, warmup_steps=warmup_steps,
                           total_steps=total_steps, end_lr_fraction=end_lr_fraction)
  _check_positive(fn, "weight_decay", weight_decay, allow_zero=True)
  for name, value in (("b1", b1), ("b2", b2)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ValueError(f"{fn}: {name}={value!r} must lie in [0, 1)")
  _check_positive(fn, "eps", eps)
  if grad_clip is not None:
    _check_positive(fn, "grad_clip", grad_clip, allow_zero=True)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=weight_decay_mask)
  if not grad_clip:
    return adamw
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
