"""Loss, jitted train/eval steps and the bfloat16 parameter cast.

Everything here is model-agnostic: a model is any ``nnx.Module`` whose call
maps int32 tokens [B, T] to logits [B, T, V].
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlib.data import text

LossFn = Callable[[nnx.Module, jax.Array, jax.Array], jax.Array]


def lm_loss(model: nnx.Module, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats/token, float32) of ``model(inputs)``
  against ``targets`` (int [B, T]; ``targets[:, t]`` is the token after
  ``inputs[:, t]``). Logits are cast to float32 before the softmax, so
  bfloat16 models get a float32 loss."""
  logits = model(inputs)
  if logits.ndim != 3 or logits.shape[:2] != targets.shape:
    raise ValueError(f"lm_loss: model(inputs) must be logits [B, T, V] with [B, T] = "
                     f"targets.shape {tuple(targets.shape)}, got {tuple(logits.shape)}")
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.mean(losses)


@functools.lru_cache(maxsize=None)
def make_train_step(loss_fn: LossFn = lm_loss):
  """``step(model, optimizer, inputs, targets) -> loss``, compiled with
  ``nnx.jit``: the loss and its gradient with respect to the ``nnx.Param``s
  (``nnx.value_and_grad``), then ``optimizer.update(model, grads)``; model and
  optimizer are updated in place. ``optimizer`` is an
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. Cached per ``loss_fn``, so
  repeated calls share one compiled step."""

  @nnx.jit
  def train_step(model, optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
    optimizer.update(model, grads)
    return loss

  return train_step


@functools.lru_cache(maxsize=None)
def make_eval_step(loss_fn: LossFn = lm_loss):
  """``step(model, inputs, targets) -> loss``, compiled with ``nnx.jit``."""

  @nnx.jit
  def eval_step(model, inputs, targets):
    return loss_fn(model, inputs, targets)

  return eval_step


train_step = make_train_step(lm_loss)
eval_step = make_eval_step(lm_loss)


def evaluate(model: nnx.Module, tokens, *, batch_size: int, seq_len: int,
             num_batches: int = 8, seed: int = 0, step_fn=None) -> float:
  """Mean loss over the fixed batches ``batch_at(tokens, i, batch_size,
  seq_len, seed)``, i < ``num_batches`` (the same batches every call, so
  evaluations at different steps compare like with like), computed on an
  ``nnx.view`` of the model in evaluation mode (``deterministic=True``,
  ``use_running_average=True`` where modules have them: no dropout, and no
  RNG stream or statistic of the model is advanced)."""
  if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"evaluate: num_batches={num_batches!r} must be an int >= 1")
  step_fn = eval_step if step_fn is None else step_fn
  model = nnx.view(model, deterministic=True, use_running_average=True,
                   raise_if_not_found=False)
  losses = []
  for i in range(num_batches):
    inputs, targets = text.batch_at(tokens, i, batch_size, seq_len, seed)
    losses.append(step_fn(model, inputs, targets))
  return float(np.mean(jax.device_get(losses)))


def cast_params(model: nnx.Module, dtype=jnp.bfloat16, *, wrt=nnx.Param) -> nnx.Module:
  """Casts, in place, every floating-point variable of ``model`` selected by
  ``wrt`` (default: the ``nnx.Param``s) to ``dtype``; integer, boolean and key
  leaves, and variables ``wrt`` does not select, are left as they are.
  Returns the model.

  The bfloat16 option trains in pure bfloat16: call this *before* creating
  ``nnx.Optimizer``, whose Adam moments then take the parameters' dtype too.
  That halves parameter and optimizer memory, but keeps no float32 master
  copy: an update smaller than about 2**-8 of a weight rounds away (no
  stochastic rounding), so late, low-learning-rate training can stall and the
  loss curve differs from float32's. Use float32 parameters (and, if wanted,
  ``dtype=jnp.bfloat16`` compute in the model's layers) where that matters.
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"cast_params: dtype={dtype} must be a floating-point dtype")

  def cast(x):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  state = nnx.state(model, wrt)
  nnx.update(model, jax.tree.map(cast, state))
  return model
