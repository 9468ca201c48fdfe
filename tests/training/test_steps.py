"""Tests for attnlib.training.steps (loss, train/eval steps, bfloat16 cast)
and for fit's training behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlib import data
from attnlib import training
from tests.training import TOKENS
from tests.training import TinyLM
from tests.training import setup


def _np_cross_entropy(logits, targets):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(-1))
  picked = np.take_along_axis(shifted, np.asarray(targets)[..., None], -1)[..., 0]
  return float(np.mean(log_z - picked))


def test_lm_loss_matches_numpy():
  model = TinyLM(rngs=nnx.Rngs(3), dropout=0.0)
  inputs, targets = data.batch_at(TOKENS, 0, 3, 10, seed=1)
  loss = training.lm_loss(model, inputs, targets)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  with jax.default_matmul_precision("highest"):
    logits = model(inputs)
  np.testing.assert_allclose(float(loss), _np_cross_entropy(logits, targets), rtol=1e-5)
  # Uniform logits: log(V).
  uniform = lambda tokens: jnp.zeros(tokens.shape + (256,), jnp.bfloat16)
  np.testing.assert_allclose(float(training.lm_loss(uniform, inputs, targets)), np.log(256),
                             rtol=1e-6)


def test_lm_loss_rejects_bad_logits():
  with pytest.raises(ValueError, match="logits"):
    training.lm_loss(lambda t: jnp.zeros(t.shape), np.zeros((2, 3), np.int32),
                     np.zeros((2, 3), np.int32))


def test_train_step_and_eval_step():
  model, optimizer, _ = setup(0, warmup_steps=0)
  inputs, targets = data.batch_at(TOKENS, 0, 4, 16)
  eval_before = float(training.eval_step(model, inputs, targets))
  losses = [float(training.train_step(model, optimizer, inputs, targets)) for _ in range(5)]
  assert int(optimizer.step[...]) == 5
  assert losses[-1] < losses[0]
  assert float(training.eval_step(model, inputs, targets)) < eval_before
  # Steps are cached per loss function.
  assert training.make_train_step(training.lm_loss) is training.train_step


def test_evaluate_is_deterministic():
  """Evaluation runs in eval mode: no dropout, no RNG advanced."""
  model, _, _ = setup(0, dropout=0.5)
  key_before = jax.random.key_data(model.dropout.rngs.key[...]).copy()
  count_before = int(model.dropout.rngs.count[...])
  a = training.evaluate(model, TOKENS, batch_size=2, seq_len=8, num_batches=3)
  b = training.evaluate(model, TOKENS, batch_size=2, seq_len=8, num_batches=3)
  assert a == b
  assert int(model.dropout.rngs.count[...]) == count_before
  np.testing.assert_array_equal(jax.random.key_data(model.dropout.rngs.key[...]), key_before)
  assert not model.dropout.deterministic  # the model itself stays in training mode
  manual = np.mean([float(training.eval_step(nnx.view(model, deterministic=True), *
                                             data.batch_at(TOKENS, i, 2, 8)))
                    for i in range(3)])
  np.testing.assert_allclose(a, manual, rtol=1e-6)


def test_fit_learns():
  steps = 80
  model, optimizer, schedule = setup(0, learning_rate=3e-2, warmup_steps=5,
                                     total_steps=steps, dropout=0.0)
  train, val = data.train_val_split(TOKENS, 0.2)
  history = training.fit(model, optimizer, train, steps=steps, batch_size=8, seq_len=32,
                         eval_tokens=val, eval_every=40, eval_batches=2, lr_schedule=schedule,
                         log_every=20, progress=False)
  assert history.steps == list(range(steps)) and len(history.loss) == steps
  assert history.start_step == 0 and not history.resumed
  assert history.eval_steps == [40, 80]
  assert history.loss[0] > 5.0  # about log(256) = 5.55 at init
  assert np.mean(history.loss[-10:]) < 0.5 * history.loss[0]
  assert history.eval_loss[-1] < history.eval_loss[0] < history.loss[0]
  np.testing.assert_allclose(history.lr, [float(schedule(s)) for s in range(steps)])
  assert history.lr[0] == 0.0 and history.tokens_per_second > 0
  assert int(optimizer.step[...]) == steps


def test_fit_continues_from_optimizer_step():
  """`steps` is the total to reach: a second call continues where the first
  stopped, on the batches an uninterrupted run would draw."""
  kwargs = dict(batch_size=4, seq_len=16, seed=2, log_every=3, progress=False)
  model, optimizer, _ = setup(1)
  full = training.fit(model, optimizer, TOKENS, steps=10, **kwargs)
  model, optimizer, _ = setup(1)
  first = training.fit(model, optimizer, TOKENS, steps=4, **kwargs)
  second = training.fit(model, optimizer, TOKENS, steps=10, **kwargs)
  assert second.start_step == 4 and second.steps == list(range(4, 10))
  assert first.loss + second.loss == full.loss
  done = training.fit(model, optimizer, TOKENS, steps=10, **kwargs)
  assert done.steps == [] and done.start_step == 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps=0"), (dict(batch_size=0), "batch_size=0"),
    (dict(seq_len=10_000), "seq_len=10000 needs"), (dict(log_every=0), "log_every=0"),
    (dict(checkpoint_every=-1), "checkpoint_every=-1"), (dict(seed=-1), "seed=-1"),
    (dict(eval_tokens=np.arange(3)), "needs at least"),
])
def test_fit_rejects(kwargs, match):
  model, optimizer, _ = setup(0)
  args = dict(steps=2, batch_size=2, seq_len=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    training.fit(model, optimizer, TOKENS, **args)


class _Mixed(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 3, rngs=rngs)
    self.ids = nnx.Param(jnp.arange(3, dtype=jnp.int32))
    self.flag = nnx.Param(jnp.array([True, False]))
    self.stat = nnx.BatchStat(jnp.ones(3, jnp.float32))
    self.count = nnx.Variable(jnp.array(7))
    self.rngs = rngs


def test_cast_params_bf16():
  model = _Mixed(nnx.Rngs(0))
  kernel = np.asarray(model.linear.kernel[...])
  key = jax.random.key_data(model.rngs.default.key[...])
  assert training.cast_params(model) is model
  assert model.linear.kernel.dtype == jnp.bfloat16 and model.linear.bias.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(model.linear.kernel[...], np.float32),
                                kernel.astype(jnp.bfloat16).astype(np.float32))
  assert model.ids.dtype == jnp.int32 and model.flag.dtype == jnp.bool_
  np.testing.assert_array_equal(model.ids[...], [0, 1, 2])
  assert model.stat.dtype == jnp.float32  # not a Param
  assert model.count.dtype == jnp.int32
  np.testing.assert_array_equal(jax.random.key_data(model.rngs.default.key[...]), key)
  training.cast_params(model, jnp.float32, wrt=nnx.Variable)
  assert model.linear.kernel.dtype == jnp.float32 and model.ids.dtype == jnp.int32
  with pytest.raises(ValueError, match="floating-point"):
    training.cast_params(model, jnp.int8)


def test_bf16_training():
  model = TinyLM(rngs=nnx.Rngs(0), dropout=0.0)
  training.cast_params(model)
  tx = training.make_optimizer(3e-2, warmup_steps=0, total_steps=40)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  mu = jax.tree.leaves(optimizer.opt_state)
  assert {x.dtype for x in mu if x.ndim} == {jnp.dtype(jnp.bfloat16)}
  history = training.fit(model, optimizer, TOKENS, steps=40, batch_size=8, seq_len=32,
                         log_every=10, progress=False)
  assert all(np.isfinite(history.loss))
  assert np.mean(history.loss[-5:]) < 0.6 * history.loss[0]
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {x.dtype for x in params} == {jnp.dtype(jnp.bfloat16)}
  mu = jax.tree.leaves(optimizer.opt_state)
  assert {x.dtype for x in mu if x.ndim} == {jnp.dtype(jnp.bfloat16)}
