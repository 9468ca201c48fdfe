"""Tests for attnlib.models.vision: NATConfig and the NAT classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlib.models.vision import NAT
from attnlib.models.vision import NATConfig

# 16x16x3 images -> stem (patch 2) 8x8x16 -> stage 0 (dilations 1, 2) ->
# downsample 4x4x32 -> stage 1 -> logits [B, 5].
TINY = dict(in_channels=3, patch_size=2, embed_dims=(16, 32), depths=(2, 1),
            num_heads=(2, 4), kernel_size=3, dilations=((1, 2), 1),
            mlp_ratio=2.0, num_classes=5)
B = 4


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _images(seed=0, b=B, size=16):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(
      (b, size, size, 3)).astype(np.float32))


@nnx.jit
def _logits(model, images):
  return model(images)


@nnx.jit
def _features(model, images):
  return model.features(images)


def _loss(model, images, labels):
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# One compiled backward pass, shared by the gradient and training tests.
_value_and_grad = nnx.jit(nnx.value_and_grad(_loss))


@nnx.jit
def _update(opt, model, grads):
  opt.update(model, grads)


@pytest.fixture(scope="module")
def model():
  # Built once: eager initialisation compiles an RNG kernel per parameter
  # shape, which is most of this file's run time on CPU.
  return NAT(NATConfig(**TINY), rngs=nnx.Rngs(0))


def _like(model, **changes):
  """A NAT of TINY + changes (same parameter shapes) with model's parameters."""
  cfg = NATConfig(**{**TINY, **changes})
  other = nnx.eval_shape(lambda: NAT(cfg, rngs=nnx.Rngs(0)))
  nnx.update(other, nnx.state(model))
  return other


def test_forward_shapes_and_dtypes(model):
  x = _images()
  logits = _logits(model, x)
  assert logits.shape == (B, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  feats = _features(model, x)
  assert feats.shape == (B, 4, 4, 32) and feats.dtype == jnp.float32
  # The logits are the classifier on the pooled features.
  want = model.head(feats.mean(axis=(1, 2)))
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_structure(model):
  assert len(model.stem) == 1 and len(model.stages) == 2
  assert [len(s) for s in model.stages] == [2, 1]
  assert [b.attn.dilation for b in model.stages[0]] == [1, 2]
  assert model.stages[1][0].attn.num_heads == 4
  assert model.stages[1][0].attn.head_dim == 8
  assert model.stages[0][0].fc1.kernel.shape == (16, 32)
  cfg = NATConfig(**{**TINY, "patch_size": 4, "embed_dims": (8, 16),
                     "dilations": None})
  four = nnx.eval_shape(lambda: NAT(cfg, rngs=nnx.Rngs(1)))  # shapes only
  assert [c.kernel.shape for c in four.stem] == [(3, 3, 3, 4), (3, 3, 4, 8)]
  graphdef, state = nnx.split(four)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state,
                       jax.ShapeDtypeStruct((B, 30, 32, 3), jnp.float32))
  assert out.shape == (B, 4, 4, 16)  # ceil(30 / 8) = 4


def test_bfloat16_model(model):
  m = _like(model, dtype=jnp.bfloat16)  # float32 parameters, bf16 compute
  x = _images()
  logits = _logits(m, x)
  assert logits.dtype == jnp.float32 and logits.shape == (B, 5)
  assert _features(m, x).dtype == jnp.bfloat16
  assert np.all(np.isfinite(logits))
  assert m.stages[0][0].fc1.kernel.dtype == jnp.float32
  # The same parameters as the float32 model: close logits.
  ref = _logits(model, x)
  assert not np.array_equal(logits, ref)
  np.testing.assert_allclose(logits, ref, atol=0.1, rtol=0.1)


def test_gradients_finite_for_every_parameter(model):
  x, labels = _images(1, b=8), jnp.arange(8) % 5
  _, grads = _value_and_grad(model, x, labels)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  for path, g in leaves:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


def test_adam_steps_reduce_the_loss(model):
  model = nnx.clone(model)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  x, labels = _images(3, b=8), jnp.arange(8) % 5

  losses = []
  for _ in range(25):
    loss, grads = _value_and_grad(model, x, labels)
    _update(opt, model, grads)
    losses.append(float(loss))
  final = float(_value_and_grad(model, x, labels)[0])
  assert np.all(np.isfinite(losses))
  # Memorising 8 random images: the loss drops far below its start (~1.7
  # here; it reaches ~0.01).
  assert final < 0.1 * losses[0], (losses, final)
  assert losses[-1] < losses[len(losses) // 2] < losses[0]


def test_logical_axis_names(model):
  P = jax.sharding.PartitionSpec
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  get = lambda *path: _at(specs, path)  # noqa: E731
  assert get("stem", 0, "kernel") == P(None, None, None, "embed")
  assert get("stages", 0, 0, "attn", "q", "kernel") == P("embed", "heads",
                                                         "head_dim")
  assert get("stages", 0, 0, "fc1", "kernel") == P("embed", "mlp")
  assert get("stages", 1, 0, "fc2", "kernel") == P("mlp", "embed")
  assert get("norm", "scale") == P("embed")
  assert get("head", "kernel") == P("embed", None)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree.get_value()


def test_call_errors(model):
  with pytest.raises(ValueError, match=r"NAT: images\.shape=\(2, 16, 16, 1\)"
                     r", expected \[B, H, W, 3\]"):
    model(jnp.zeros((2, 16, 16, 1)))
  with pytest.raises(ValueError, match=r"images\.shape=\(16, 16, 3\)"):
    model(jnp.zeros((16, 16, 3)))
  # 8x8 images: stage 0 is 4x4, too small for kernel 3 with dilation 2.
  with pytest.raises(ValueError, match=r"kernel_size \* dilation=\(6, 6\), "
                     r"expected at most the spatial shape \(4, 4\)"):
    model(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"config='dict', expected a NATConfig"):
    NAT(TINY, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=0), r"in_channels=0, expected an int >= 1"),
    (dict(num_classes=True), r"num_classes=True, expected an int >= 1"),
    (dict(patch_size=3), r"patch_size=3, expected a power of 2 >= 2"),
    (dict(patch_size=1), r"patch_size=1, expected a power of 2 >= 2"),
    (dict(embed_dims=()), r"embed_dims=\(\), expected a non-empty tuple"),
    (dict(embed_dims=(16, 0)), r"embed_dims=\(16, 0\), expected a non-empty"),
    (dict(depths=(2,)), r"depths=\(2,\), expected a tuple of 2 ints >= 1"),
    (dict(depths=(2, 0)), r"depths=\(2, 0\), expected a tuple of 2 ints"),
    (dict(num_heads=(3, 4)), r"num_heads=\(3, 4\), expected divisors of "
     r"embed_dims=\(16, 32\)"),
    (dict(kernel_size=1), r"kernel_size=1, expected an int >= 2"),
    (dict(dilations=(1,)), r"dilations=\(1,\), expected None or a tuple of 2"),
    (dict(dilations=((1,), 1)), r"dilations=\(\(1,\), 1\), expected None or"),
    (dict(dilations=(0, 1)), r"dilations=\(0, 1\), expected None or"),
    (dict(mlp_ratio=0.0), r"mlp_ratio=0.0, expected a finite number > 0"),
    (dict(mlp_ratio=float("nan")), r"mlp_ratio=nan, expected a finite"),
    (dict(dtype=jnp.int32), r"dtype=.*int32.*, expected a floating dtype"),
    (dict(param_dtype="nonsense"), r"param_dtype='nonsense', expected a "
     r"floating dtype"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match="NATConfig: " + match):
    NATConfig(**{**TINY, **kwargs})


def test_config_tuples_frozen_hashable():
  cfg = NATConfig(**{**TINY, "embed_dims": [16, 32], "depths": [2, 1],
                     "num_heads": [2, 4], "dilations": [[1, 2], 1]})
  assert cfg == NATConfig(**TINY) and hash(cfg) == hash(NATConfig(**TINY))
  assert cfg.block_dilations(0) == (1, 2) and cfg.block_dilations(1) == (1,)
  assert NATConfig().block_dilations(2) == (1,) * 18
  with pytest.raises(AttributeError):
    cfg.kernel_size = 5  # type: ignore[misc]
