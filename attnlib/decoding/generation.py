"""Autoregressive generation with a cache-decoding model.

`generate` works with any `flax.nnx.Module` that has

* ``init_cache(batch, max_len) -> cache`` (a pytree), and
* ``decode(tokens [B, T] int32, cache) -> (logits [B, T, V], cache)``,

e.g. `attnlib.models.TransformerLM`. It prefills the cache with one
``decode`` of the prompt, then decodes one token per step inside a
``lax.fori_loop``; prefill and loop are one ``jax.jit`` over the model's
``nnx.split`` state (compiled once per model graph, prompt shape,
max_new_tokens, max_len, top_k and greedy-or-not; the temperature is
traced).
`sample_logits` is the sampling rule of every step.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlib.ops import _checks

Array = jax.Array


def _check_sampling(op: str, temperature: Any, top_k: Any,
                    vocab: int | None) -> None:
  if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
      or not math.isfinite(temperature) or temperature < 0):
    _checks.fail(op, "temperature", temperature, "a finite number >= 0")
  if top_k is not None:
    if not _checks.is_int(top_k) or top_k < 1:
      _checks.fail(op, "top_k", top_k, "None or an int >= 1")
    if vocab is not None and top_k > vocab:
      _checks.fail(op, "top_k", top_k, f"<= the vocabulary size {vocab}")


def _sample(logits: Array, rng: Array | None, temperature: Any,
            top_k: int | None, greedy: bool) -> Array:
  """greedy is static; temperature (> 0 unless greedy) may be traced."""
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k is None:
    return jax.random.categorical(rng, logits / temperature,
                                  axis=-1).astype(jnp.int32)
  values, indices = jax.lax.top_k(logits, top_k)          # [..., k]
  pick = jax.random.categorical(rng, values / temperature, axis=-1)
  return jnp.take_along_axis(indices, pick[..., None],
                             axis=-1)[..., 0].astype(jnp.int32)


def sample_logits(logits: Array, rng: Array | None, temperature: float = 0.0,
                  top_k: int | None = None) -> Array:
  """One token per row of ``logits`` [..., V].

  * ``temperature == 0``: greedy, ``argmax(logits)`` (rng unused; may be
    None).
  * ``temperature > 0``: a draw from ``softmax(logits / temperature)``
    restricted to the ``top_k`` largest logits (all V when top_k is None);
    ``top_k=1`` is the argmax.

  Args:
    logits: [..., V] floating (computed in float32).
    rng: a PRNG key (required when temperature > 0).
    temperature: a finite number >= 0 (a Python scalar: greedy or not is
      decided at trace time; in `generate` its value is traced, so changing
      a nonzero temperature does not recompile).
    top_k: None or an int in [1, V].

  Returns:
    int32 [...] token ids in [0, V).

  Raises:
    ValueError: logits not a floating array of rank >= 1, a bad temperature
      or top_k, or rng None with temperature > 0.
  """
  op = "attnlib.decoding.sample_logits"
  if (not hasattr(logits, "shape") or not hasattr(logits, "dtype")
      or logits.ndim < 1 or logits.shape[-1] < 1):
    _checks.fail(op, "logits.shape", _checks.shape_of(logits),
                 "[..., V] with V >= 1")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    _checks.fail(op, "logits.dtype", str(logits.dtype), "a floating dtype")
  _check_sampling(op, temperature, top_k, logits.shape[-1])
  if temperature > 0 and rng is None:
    _checks.fail(op, "rng", None, "a PRNG key when temperature > 0")
  return _sample(logits, rng, temperature, top_k, temperature == 0)


# temperature is traced (changing it does not recompile); whether it is 0
# (greedy), top_k, the lengths and the model's graph are static.
@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "greedy", "top_k", "max_len"))
def _generate(graphdef, state, prompt, rng, temperature, *, max_new_tokens,
              greedy, top_k, max_len):
  model = nnx.merge(graphdef, state)
  batch, t0 = prompt.shape
  keys = (jax.random.split(rng, max_new_tokens) if rng is not None
          else [None] * max_new_tokens)
  cache = model.init_cache(batch, max_len)
  logits, cache = model.decode(prompt, cache)
  first = _sample(logits[:, -1], None if rng is None else keys[0],
                  temperature, top_k, greedy)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def step(i, carry):
    out, cache = carry
    token = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)   # [B, 1]
    logits, cache = model.decode(token, cache)
    nxt = _sample(logits[:, -1], None if rng is None else keys[i],
                  temperature, top_k, greedy)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
    return out, cache

  out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache))
  return jnp.concatenate([prompt.astype(jnp.int32), out], axis=1)


def generate(model: nnx.Module, prompt: Array, max_new_tokens: int, *,
             rng: Array | None, temperature: float = 0.0,
             top_k: int | None = None, max_len: int | None = None) -> Array:
  """Extends ``prompt`` by ``max_new_tokens`` tokens sampled from ``model``.

  Prefill: ``model.decode(prompt, model.init_cache(B, max_len))``; then each
  new token is `sample_logits` of the last logits and is decoded (T = 1) to
  get the next logits. Greedy when ``temperature == 0``. Every step draws
  with its own key split from ``rng``. The whole loop is compiled
  (``jax.jit`` over ``nnx.split(model)``; the model is not modified).

  Args:
    model: an nnx Module with ``init_cache(batch, max_len)`` and
      ``decode(tokens, cache) -> (logits [B, T, V], cache)``.
    prompt: [B, T0] integer token ids, T0 >= 1.
    max_new_tokens: N >= 0 (0 returns the prompt).
    rng: a PRNG key; may be None when temperature == 0.
    temperature: a finite number >= 0.
    top_k: None or an int >= 1 (at most the vocabulary size).
    max_len: the cache capacity, >= T0 + N; None means T0 + N.

  Returns:
    int32 [B, T0 + N]: the prompt followed by the generated tokens.

  Raises:
    ValueError: a model without init_cache / decode, a bad prompt, a
      negative or non-int max_new_tokens, a bad temperature, top_k or
      max_len, or rng None with temperature > 0.
  """
  op = "attnlib.decoding.generate"
  for name in ("init_cache", "decode"):
    if not callable(getattr(model, name, None)):
      _checks.fail(op, "model", type(model).__name__,
                   "an nnx Module with init_cache(batch, max_len) and "
                   "decode(tokens, cache)")
  if (not hasattr(prompt, "shape") or not hasattr(prompt, "dtype")
      or prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1):
    _checks.fail(op, "prompt.shape", _checks.shape_of(prompt),
                 "[B, T0] with B, T0 >= 1")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    _checks.fail(op, "prompt.dtype", str(prompt.dtype), "an integer dtype")
  if not _checks.is_int(max_new_tokens) or max_new_tokens < 0:
    _checks.fail(op, "max_new_tokens", max_new_tokens, "an int >= 0")
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  _check_sampling(op, temperature, top_k, vocab)
  if temperature > 0 and rng is None:
    _checks.fail(op, "rng", None, "a PRNG key when temperature > 0")
  need = prompt.shape[1] + max_new_tokens
  if max_len is None:
    max_len = need
  if not _checks.is_int(max_len) or max_len < need:
    _checks.fail(op, "max_len", max_len,
                 f"an int >= T0 + max_new_tokens = {need}")
  prompt = jnp.asarray(prompt, jnp.int32)
  if max_new_tokens == 0:
    return prompt
  graphdef, state = nnx.split(model)
  greedy = temperature == 0
  return _generate(graphdef, state, prompt, None if greedy else rng,
                   jnp.float32(temperature), max_new_tokens=max_new_tokens,
                   greedy=greedy, top_k=None if greedy else top_k,
                   max_len=max_len)


__all__ = ["generate", "sample_logits"]
