"""The language model of ``experiments/train.py`` and ``generate.py``: the
``--layers`` pattern language, the defaults, and the JSON form of an
``LMConfig`` saved next to the checkpoints.

A layer pattern is a comma-separated list of tokens, cycled over
``num_layers`` layers (``attnlib.models.layer_pattern``): ``"gate,window"``
with 4 layers is gate, window, gate, window. Tokens (``LAYER_TOKENS``):

  softmax  causal softmax attention with RoPE
  linear   causal linear attention, elu+1 feature map, no decay
  taylor   causal linear attention, 2nd-order Taylor feature map (BASED's)
  rate     linear attention with a learned per-head decay rate (RetNet)
  gate     linear attention with data-dependent gates (GLA)
  window   causal sliding-window softmax with RoPE, left reach ``window``
  sigmoid  causal sigmoid attention with RoPE, fixed bias -log(seq_len)
  aaren    Aaren: attention as a prefix scan (learned constant query)
  based    shorthand for "taylor,window" (BASED)

Every linear kind (linear, taylor, rate, gate) normalizes each head's output
with an RMSNorm (``output_norm=True``): the op itself is unnormalized.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from attnlib.models import LMConfig
from attnlib.models import layer_pattern
from attnlib.nn import AttentionConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

LAYER_TOKENS = ("softmax", "linear", "taylor", "rate", "gate", "window",
                "sigmoid", "aaren", "based")
ALIASES = {"based": ("taylor", "window")}
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def layer_config(token: str, *, window: int, seq_len: int) -> AttentionConfig:
  """The ``AttentionConfig`` of one pattern token (not an alias)."""
  if token == "softmax":
    return AttentionConfig(kind="softmax", rope=True)
  if token == "linear":
    return AttentionConfig(kind="linear", output_norm=True)
  if token == "taylor":
    return AttentionConfig(kind="linear", feature_map="taylor", output_norm=True)
  if token == "rate":
    return AttentionConfig(kind="linear", decay="rate", output_norm=True)
  if token == "gate":
    return AttentionConfig(kind="linear", decay="gate", output_norm=True)
  if token == "window":
    return AttentionConfig(kind="sliding_window", window=window, rope=True)
  if token == "sigmoid":
    # A fixed bias (the op's default -log(T) at the training length), so the
    # layer can decode.
    return AttentionConfig(kind="sigmoid", bias=-math.log(seq_len), rope=True)
  if token == "aaren":
    return AttentionConfig(kind="aaren")
  raise ValueError(f"unknown layer token {token!r}: expected one of "
                   f"{', '.join(LAYER_TOKENS)}")


def parse_layers(spec: str, num_layers: int, *, window: int,
                 seq_len: int) -> tuple[AttentionConfig, ...]:
  """``num_layers`` configs cycling the comma-separated tokens of ``spec``.

  Raises:
    ValueError: an empty pattern or token, an unknown token, or bad sizes.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"--layers={spec!r}: expected a comma-separated list of "
                     f"{', '.join(LAYER_TOKENS)}")
  tokens = [t.strip().lower() for t in spec.split(",")]
  if any(not t for t in tokens):
    raise ValueError(f"--layers={spec!r} has an empty token")
  expanded = []
  for t in tokens:
    expanded.extend(ALIASES.get(t, (t,)))
  unknown = [t for t in expanded if t not in LAYER_TOKENS]
  if unknown:
    raise ValueError(f"--layers={spec!r}: unknown token {unknown[0]!r}; expected "
                     f"a comma-separated list of {', '.join(LAYER_TOKENS)}")
  if isinstance(window, bool) or not isinstance(window, int) or window < 0:
    raise ValueError(f"--window={window!r} must be an int >= 0")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f"--seq_len={seq_len!r} must be an int >= 2")
  pattern = tuple(layer_config(t, window=window, seq_len=seq_len) for t in expanded)
  return layer_pattern(num_layers, pattern)


def describe(layer: AttentionConfig) -> str:
  """A short name of a layer config: "linear(gate)", "sliding_window(64)"..."""
  opts = [o for o in (layer.feature_map, layer.decay) if o]
  if layer.window is not None:
    opts.append(str(layer.window))
  return layer.kind + (f"({','.join(opts)})" if opts else "")


# ---------------------------------------------------------------- JSON form


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def config_to_dict(cfg: LMConfig) -> dict:
  """A JSON-able dict of ``cfg`` (``config_from_dict`` inverts it)."""
  out = {}
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name == "layers":
      value = [dataclasses.asdict(layer) for layer in value]
    elif field.name in ("dtype", "param_dtype"):
      value = _dtype_name(value)
    out[field.name] = value
  return out


def config_from_dict(d: dict) -> LMConfig:
  """The ``LMConfig`` of a ``config_to_dict`` dict."""
  d = dict(d)
  layers = []
  for layer in d.pop("layers"):
    layer = dict(layer)
    if isinstance(layer.get("window"), list):
      layer["window"] = tuple(layer["window"])
    layers.append(AttentionConfig(**layer))
  for name in ("dtype", "param_dtype"):
    if name in d:
      d[name] = jnp.dtype(d[name])
  return LMConfig(layers=tuple(layers), **d)


def save_config(workdir: str, model: LMConfig, train: dict | None = None) -> str:
  """Writes ``{"model": ..., "train": ...}`` to ``workdir/config.json``."""
  path = os.path.join(workdir, CONFIG_FILE)
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"model": config_to_dict(model), "train": train or {}}, f, indent=2)
    f.write("\n")
  return path


def load_config(workdir: str) -> tuple[LMConfig, dict]:
  """(model config, training flags) saved by ``save_config``."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir!r} (train a model there "
                            "with experiments/train.py --workdir=...)")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  return config_from_dict(saved["model"]), saved.get("train", {})
