"""Tests for attnlib.training.optim: schedule, weight-decay mask, AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlib import training
from tests.training import TinyLM


def _expected_lr(step, peak, warmup, total, end_fraction):
  """Linear warmup from 0, then cosine from peak to end at `total`."""
  end = peak * end_fraction
  if step < warmup:
    return peak * step / warmup
  t = min(step, total) - warmup
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t / (total - warmup)))


@pytest.mark.parametrize("warmup, total, end_fraction", [(10, 100, 0.1), (0, 50, 0.0),
                                                         (5, 6, 0.5)])
def test_schedule(warmup, total, end_fraction):
  schedule = training.make_schedule(3e-3, warmup_steps=warmup, total_steps=total,
                                    end_lr_fraction=end_fraction)
  for step in sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, (warmup + total) // 2,
                      total - 1, total, total + 7}):
    np.testing.assert_allclose(float(schedule(step)),
                               _expected_lr(step, 3e-3, warmup, total, end_fraction),
                               rtol=1e-5, atol=1e-12, err_msg=f"step {step}")


def test_optimizer_uses_schedule():
  """Adam's first update is -lr * sign(g); with warmup 0 the lr is the peak."""
  tx = training.make_optimizer(0.2, warmup_steps=0, total_steps=10, weight_decay=0.0,
                               grad_clip=None)
  params = {"w": jnp.ones((2, 2))}
  state = tx.init(params)
  grads = {"w": jnp.array([[1.0, -2.0], [3.0, -4.0]])}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -0.2 * np.sign(grads["w"]), rtol=1e-6)
  # The second update uses schedule(1).
  lr1 = float(training.make_schedule(0.2, warmup_steps=0, total_steps=10)(1))
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -lr1 * np.sign(grads["w"]), rtol=1e-4)


def test_weight_decay_mask_on_model():
  model = TinyLM(rngs=nnx.Rngs(0))
  mask = training.weight_decay_mask(nnx.state(model, nnx.Param))
  assert nnx.to_pure_dict(mask) == {"embed": {"embedding": True},
                                    "norm": {"bias": False, "scale": False},
                                    "out": {"bias": False, "kernel": True}}


def test_weight_decay_mask_on_plain_tree():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "layer": {"scale": jnp.ones((2, 2)),
            "q_bias": jnp.ones((2, 3)), "query": jnp.ones((2, 3)), "t": jnp.ones(())}}
  assert training.weight_decay_mask(params) == {
      "w": True, "b": False, "layer": {"scale": False, "q_bias": False, "query": True,
                                       "t": False}}


def test_weight_decay_applies_to_matrices_only():
  """Zero gradients: AdamW's update is -lr * weight_decay * param where decayed."""
  tx = training.make_optimizer(0.1, warmup_steps=0, total_steps=10, weight_decay=0.5)
  params = {"w": jnp.full((3, 3), 2.0), "b": jnp.full((3,), 2.0)}
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], 0.0)


def test_weight_decay_in_nnx_optimizer():
  model = TinyLM(rngs=nnx.Rngs(0))
  before = {k: v[...] for k, v in [("embedding", model.embed.embedding),
                                   ("kernel", model.out.kernel), ("bias", model.out.bias),
                                   ("scale", model.norm.scale)]}
  tx = training.make_optimizer(0.1, warmup_steps=0, total_steps=10, weight_decay=0.5)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zeros)
  np.testing.assert_allclose(model.out.kernel[...], before["kernel"] * (1 - 0.05), rtol=1e-6)
  np.testing.assert_allclose(model.embed.embedding[...], before["embedding"] * 0.95, rtol=1e-6)
  np.testing.assert_array_equal(model.out.bias[...], before["bias"])
  np.testing.assert_array_equal(model.norm.scale[...], before["scale"])


def test_gradient_clipping():
  """With clipping, a step's first moment is built from the clipped gradient."""
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # global norm 5
  for clip, scale in ((1.0, 0.2), (None, 1.0), (10.0, 1.0)):
    tx = training.make_optimizer(0.1, warmup_steps=0, total_steps=10, grad_clip=clip)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["w"], 0.1 * scale * grads["w"], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(learning_rate=-1.0), "learning_rate=-1.0"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(warmup_steps=10, total_steps=10), "total_steps=10 must be an int > warmup_steps=10"),
    (dict(total_steps=2.5), "total_steps=2.5"),
    (dict(end_lr_fraction=1.5), "end_lr_fraction=1.5"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(b2=1.0), "b2=1.0"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0"),
])
def test_make_optimizer_rejects(kwargs, match):
  args = dict(learning_rate=1e-3, warmup_steps=2, total_steps=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    training.make_optimizer(args.pop("learning_rate"), **args)
