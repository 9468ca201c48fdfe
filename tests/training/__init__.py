"""Tests for attnlib.training. ``TinyLM`` and ``setup`` are shared by the test
files (and by the child process of the kill-and-resume test)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlib import data
from attnlib import training

# A learnable corpus: every byte determines the next one.
TEXT = "the quick brown fox jumps over the lazy dog; " * 40
TOKENS = data.encode(TEXT)


class TinyLM(nnx.Module):
  """Embedding -> LayerNorm -> Dropout -> Linear: a bigram model with biases,
  norm scales, an RNG stream (dropout) and an int counter, so training and
  checkpoints see every kind of state a real model has."""

  def __init__(self, *, rngs: nnx.Rngs, embed_dim: int = 32, dropout: float = 0.1):
    self.embed = nnx.Embed(data.VOCAB_SIZE, embed_dim, rngs=rngs)
    self.norm = nnx.LayerNorm(embed_dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(embed_dim, data.VOCAB_SIZE, rngs=rngs)
    self.calls = nnx.Variable(jnp.array(0, jnp.int32))

  def __call__(self, tokens):
    self.calls[...] += 1
    return self.out(self.dropout(self.norm(self.embed(tokens))))


def setup(seed: int = 0, *, learning_rate: float = 3e-2, warmup_steps: int = 3,
          total_steps: int = 12, dropout: float = 0.1):
  """A fresh (model, optimizer, schedule)."""
  model = TinyLM(rngs=nnx.Rngs(params=seed, dropout=seed + 100), dropout=dropout)
  kwargs = dict(warmup_steps=warmup_steps, total_steps=total_steps)
  tx = training.make_optimizer(learning_rate, **kwargs)
  schedule = training.make_schedule(learning_rate, **kwargs)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param), schedule


def pure_state(obj):
  """nnx.state(obj) as a flat {path: numpy array} (keys as their key data)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(obj)))[0]:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
  return flat


def assert_same_state(a, b, *, ignore=()):
  """Every leaf of nnx.state(a) equals b's bit for bit (but paths in `ignore`)."""
  sa, sb = pure_state(a), pure_state(b)
  assert sa.keys() == sb.keys()
  for key in sa:
    if key in ignore:
      continue
    assert sa[key].dtype == sb[key].dtype, key
    np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
