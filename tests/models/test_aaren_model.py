"""Tests for attnlib.models.aaren: AarenConfig and AarenModel (heads, causality,
streaming decode == full forward, gradients, training on toy tasks, the
causal-Transformer baseline of the same shape)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlib.models.aaren import AarenConfig
from attnlib.models.aaren import AarenModel
from attnlib.nn.attention import AttentionConfig as A

B, T, F, E, H, D, M, C = 2, 12, 3, 16, 2, 8, 32, 4
# Observed errors of decode vs forward are ~1e-6 (float32, exact matmuls).
TOL = dict(atol=5e-6, rtol=1e-5)
CHUNKS = (5, 1, 1, 5)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _cfg(**kwargs):
  kw = dict(input_dim=F, embed_dim=E, num_heads=H, head_dim=D, mlp_dim=M,
            num_layers=2, max_len=32)
  kw.update(kwargs)
  return AarenConfig(**kw)


_MODELS = {}


def _model(seed=0, **kwargs):
  key = (seed, tuple(sorted(kwargs.items())))
  if key not in _MODELS:
    _MODELS[key] = AarenModel(_cfg(**kwargs), rngs=nnx.Rngs(seed))
  return _MODELS[key]


def _x(seed=1, b=B, t=T, f=F):
  return jax.random.normal(jax.random.key(seed), (b, t, f), jnp.float32)


@nnx.jit
def _forward(model, x):
  return model(x)


@nnx.jit
def _decode(model, x, cache):
  return model.decode(x, cache)


def _stream(model, x, chunks=CHUNKS):
  cache = model.init_cache(x.shape[0])
  out, start = [], 0
  for size in chunks:
    y, cache = _decode(model, x[:, start:start + size], cache)
    out.append(y)
    start += size
  assert start == x.shape[1]
  return jnp.concatenate(out, axis=1), cache


CLS = dict(head="classification", num_classes=C)
SOFTMAX = A(kind="softmax", rope=True)


# -------------------------------------------------------------------- config


def test_config_defaults():
  cfg = AarenConfig(input_dim=3, embed_dim=16, num_heads=2)
  assert cfg.layers == (A(kind="aaren"),) * 2
  assert cfg.head == "forecasting" and cfg.output_dim == 3
  assert cfg.out_dim == 3 and cfg.num_classes is None
  cfg = dataclasses.replace(cfg, head="classification", num_classes=5,
                            output_dim=None)
  assert cfg.out_dim == 5
  base = AarenConfig(input_dim=3, embed_dim=16, num_heads=2, layers=SOFTMAX,
                     num_layers=3)
  assert base.layers == (SOFTMAX,) * 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(input_dim=0), "input_dim"),
    (dict(head="regression"), "head"),
    (dict(head="classification"), "num_classes"),
    (dict(head="classification", num_classes=2, output_dim=3), "output_dim"),
    (dict(num_classes=3), "num_classes"),
    (dict(output_dim=0), "output_dim"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(layers=(A(kind="aaren"),) * 3), "layers"),
    (dict(layers=A(kind="softmax", is_causal=False)), "layers[0].is_causal"),
    (dict(max_len=0), "max_len"),
    (dict(norm_eps=-1.0), "norm_eps"),
])
def test_config_errors(kwargs, field):
  with pytest.raises(ValueError, match=re.escape(f"AarenConfig: {field}=")):
    _cfg(**kwargs)


def test_model_errors():
  model = _model()
  with pytest.raises(ValueError, match="config="):
    AarenModel("cfg", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x.shape=\(2, 4, 5\)"):
    model(jnp.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match="x.dtype='int32'"):
    model(jnp.zeros((2, 4, F), jnp.int32))
  with pytest.raises(ValueError, match="decode: cache="):
    model.decode(_x(), ())
  with pytest.raises(ValueError, match="init_cache: batch=0"):
    model.init_cache(0)


# -------------------------------------------------------------------- heads


def test_query_parameters():
  model = _model()
  for block in model.blocks:
    assert block.attn.query is not None and block.attn.q is None
    assert block.attn.query.shape == (H, D)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["blocks"][0]["attn"]["query"].get_value()) == (
      "heads", "head_dim")
  assert tuple(specs["in_proj"]["kernel"].get_value()) == (None, "embed")
  assert tuple(specs["head"]["kernel"].get_value()) == ("embed", None)


def test_forecasting_shapes_and_causality():
  model = _model(output_dim=2)
  x = _x()
  y = _forward(model, x)
  assert y.shape == (B, T, 2) and y.dtype == jnp.float32
  assert np.all(np.isfinite(y))
  t = T // 2
  y2 = _forward(model, x.at[:, t].add(1.0))
  np.testing.assert_array_equal(y2[:, :t], y[:, :t])
  assert not np.allclose(y2[:, t], y[:, t])


def test_classification_shape_reads_last_step():
  model = _model(**CLS)
  x = _x()
  logits = _forward(model, x)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  # The last step's representation: the head applied to features[:, -1].
  feats = nnx.jit(lambda m, x: m.features(x))(model, x)
  assert feats.shape == (B, T, E)
  np.testing.assert_allclose(logits, model.head(feats[:, -1]), **TOL)
  # A change anywhere in the sequence reaches it.
  assert not np.allclose(_forward(model, x.at[:, 0].add(1.0)), logits)


# ------------------------------------------------------------------ decode


@pytest.mark.parametrize("layers", ["aaren", "softmax", "mixed"])
def test_streaming_forecast_equals_forward(layers):
  kw = {"aaren": {}, "softmax": dict(layers=SOFTMAX),
        "mixed": dict(layers=(A(kind="aaren"), A(kind="linear",
                                                 decay="gate")))}[layers]
  model = _model(**kw)
  x = _x(seed=2)
  full = _forward(model, x)
  streamed, cache = _stream(model, x)
  np.testing.assert_allclose(streamed, full, **TOL)
  assert all(int(c.length) == T for c in cache)


def test_streaming_classification_equals_forward():
  model = _model(**CLS)
  x = _x(seed=3)
  per_step, _ = _stream(model, x)
  assert per_step.shape == (B, T, C)
  np.testing.assert_allclose(per_step[:, -1], _forward(model, x), **TOL)
  # The prediction after every prefix is the model on that prefix.
  for t in (1, T // 2):
    np.testing.assert_allclose(per_step[:, t - 1], _forward(model, x[:, :t]),
                               **TOL)


def test_aaren_state_constant_in_max_len():
  model = _model()
  shapes = lambda n: jax.tree.map(lambda a: (a.shape, a.dtype),  # noqa: E731
                                  model.init_cache(B, n))
  assert shapes(8) == shapes(100_000)
  # O(1) per layer: m [B, H], u [B, H], w [B, H, D] and a length.
  assert sum(a.size for a in jax.tree.leaves(model.init_cache(B, 8)[0])) == (
      B * H * (D + 2) + 1)


# ------------------------------------------------------- gradients, training


def _forecast_loss(model, x):
  """Next-step MSE: out[:, t] predicts x[:, t + 1]."""
  return jnp.mean((model(x[:, :-1]) - x[:, 1:]) ** 2)


def _class_loss(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      model(x), labels).mean()


def _train(model, loss_fn, batch, steps, lr):
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, *batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
    opt.update(model, grads)
    return loss, grads

  losses, grads0 = [], None
  for _ in range(steps):
    loss, grads = step(model, opt, *batch)
    grads0 = grads if grads0 is None else grads0
    losses.append(float(loss))
  return grads0, losses


def _sines(seed, b, t):
  """F sine waves with random frequencies and phases: [b, t, F]."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  freq = jax.random.uniform(k1, (b, 1, F), minval=0.3, maxval=0.8)
  phase = jax.random.uniform(k2, (b, 1, F), maxval=2 * np.pi)
  return jnp.sin(freq * jnp.arange(t)[None, :, None] + phase)


def test_forecasting_grads_flow_and_trains():
  model = AarenModel(_cfg(), rngs=nnx.Rngs(5))
  x = _sines(0, 8, 16)
  grads, losses = _train(model, _forecast_loss, (x,), steps=30, lr=1e-2)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  names = [jax.tree_util.keystr(p) for p, _ in leaves]
  assert any("query" in n for n in names)
  for path, g in leaves:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.any(g != 0), jax.tree_util.keystr(path)
  assert losses[-1] < 0.3 * losses[0], losses


def test_classification_trains():
  """Toy task: is the mean of feature 0 over the sequence positive?"""
  model = AarenModel(_cfg(head="classification", num_classes=2),
                     rngs=nnx.Rngs(6))
  x = _x(seed=4, b=16, t=8)
  labels = (x[..., 0].mean(axis=1) > 0).astype(jnp.int32)
  _, losses = _train(model, _class_loss, (x, labels), steps=25, lr=1e-2)
  assert losses[-1] < 0.5 * losses[0], losses
