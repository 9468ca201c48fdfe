r"""Trains a byte-level language model (``attnlib.models.TransformerLM``).

With no flags it trains a small hybrid model (4 layers of width 128: gated
linear attention alternating with sliding-window softmax) on the ``.py`` files
of the running Python's standard library (read at run time: nothing is
downloaded), on CPU in a few minutes; it logs the loss (absl logging, and a
progress bar when stderr is a terminal), evaluates on held-out bytes, saves
checkpoints and the model config (``<workdir>/config.json``) and prints the
final eval loss and samples::

  .venv/bin/python experiments/train.py
  .venv/bin/python experiments/train.py --data=book.txt --layers=softmax \
      --workdir=/tmp/book --steps=2000
  .venv/bin/python experiments/generate.py --workdir=/tmp/attnlib_train \
      --prompt='def '

Run again with the same ``--workdir`` (and model flags) to resume from its
latest checkpoint; a larger ``--steps`` continues training (the learning-rate
schedule is stretched to the new total).

``--layers`` is a comma-separated pattern cycled over ``--num_layers``
layers; its tokens are listed in ``experiments/configs/lm.py`` (softmax,
linear, taylor, rate, gate, window, sigmoid, aaren, and ``based`` for
"taylor,window"). All attention runs with ``implementation=None`` (the
platform's kernels where they fit, the pure-JAX reference on CPU).
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from configs import lm as lm_config  # experiments/configs (sys.path[0])

_DATA = flags.DEFINE_string(
    "data", "", "A text file to train on (byte-level tokens); empty: the .py files of "
    "the Python standard library.")
_MAX_BYTES = flags.DEFINE_integer(
    "max_bytes", None, "Use at most this many bytes of the corpus (default: all).")
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.05, "The fraction of the corpus (its tail) held out for eval.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/attnlib_train", "Checkpoints (<workdir>/checkpoints) and the "
    "model config (<workdir>/config.json); a run resumes from its latest checkpoint.")
_STEPS = flags.DEFINE_integer("steps", 300, "Total training steps (updates).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens (bytes) per sequence.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 50, "Linear warm-up steps.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices).")
_LAYERS = flags.DEFINE_string(
    "layers", "gate,window", "Comma-separated attention pattern cycled over the "
    "layers; tokens: " + ", ".join(lm_config.LAYER_TOKENS) + ".")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 128, "Model width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Number of blocks.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads per layer.")
_NUM_KV_HEADS = flags.DEFINE_integer(
    "num_kv_heads", None, "Key/value heads (GQA/MQA); default: num_heads.")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", None, "SwiGLU width; default: 4 * embed_dim.")
_WINDOW = flags.DEFINE_integer("window", 64, "Left reach of the 'window' layers.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "float32", sorted(lm_config.PARAM_DTYPES),
    "Parameter (and compute) dtype; bfloat16 trains in pure bfloat16.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Evaluate every so many steps "
                                   "(0: only at the end).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Batches per evaluation.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 100, "Checkpoint every so many steps (0: only at the end).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Log the loss every so many steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialization, data order and "
                             "samples.")
_SAMPLE_PROMPT = flags.DEFINE_string("sample_prompt", "def ", "Prompt of the samples.")
_SAMPLE_TOKENS = flags.DEFINE_integer(
    "sample_tokens", 200, "Bytes per sample printed at the end (0: no samples).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Samples printed at the end.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the top k bytes only.")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise app.UsageError(message)


def check_flags() -> None:
  """app.UsageError (exit code 1, the message on stderr) for bad values."""
  for flag, minimum in ((_STEPS, 1), (_BATCH_SIZE, 1), (_SEQ_LEN, 2), (_EMBED_DIM, 1),
                        (_NUM_LAYERS, 1), (_NUM_HEADS, 1), (_WINDOW, 0),
                        (_WARMUP_STEPS, 0), (_EVAL_EVERY, 0), (_EVAL_BATCHES, 1),
                        (_CHECKPOINT_EVERY, 0), (_LOG_EVERY, 1), (_SEED, 0),
                        (_SAMPLE_TOKENS, 0), (_NUM_SAMPLES, 1)):
    _check(flag.value >= minimum, f"--{flag.name}={flag.value} must be >= {minimum}")
  for flag in (_MAX_BYTES, _NUM_KV_HEADS, _MLP_DIM, _TOP_K):
    _check(flag.value is None or flag.value >= 1,
           f"--{flag.name}={flag.value} must be >= 1 (or unset)")
  _check(_TOP_K.value is None or _TOP_K.value <= 256,
         f"--top_k={_TOP_K.value} must be <= 256 (the byte vocabulary)")
  _check(math.isfinite(_LEARNING_RATE.value) and _LEARNING_RATE.value > 0,
         f"--learning_rate={_LEARNING_RATE.value} must be > 0")
  _check(math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value >= 0,
         f"--temperature={_TEMPERATURE.value} must be >= 0")
  _check(0 < _VAL_FRACTION.value < 1, f"--val_fraction={_VAL_FRACTION.value} must lie "
         "in (0, 1)")
  _check(bool(_SAMPLE_PROMPT.value) or not _SAMPLE_TOKENS.value,
         "--sample_prompt must not be empty")
  if _DATA.value:
    _check(os.path.isfile(_DATA.value), f"--data={_DATA.value!r} is not a file")


def model_config():
  """The ``LMConfig`` the flags describe (app.UsageError if invalid)."""
  from attnlib.models import LMConfig  # pylint: disable=import-outside-toplevel
  try:
    layers = lm_config.parse_layers(_LAYERS.value, _NUM_LAYERS.value,
                                    window=_WINDOW.value, seq_len=_SEQ_LEN.value)
    dtype = lm_config.PARAM_DTYPES[_PARAM_DTYPE.value]
    return LMConfig(embed_dim=_EMBED_DIM.value, num_layers=_NUM_LAYERS.value,
                    num_heads=_NUM_HEADS.value, num_kv_heads=_NUM_KV_HEADS.value,
                    mlp_dim=_MLP_DIM.value, layers=layers, dtype=dtype,
                    param_dtype=dtype)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def train_flags() -> dict:
  names = ("data", "max_bytes", "val_fraction", "steps", "batch_size", "seq_len",
           "learning_rate", "warmup_steps", "weight_decay", "layers", "window", "seed")
  return {name: flags.FLAGS[name].value for name in names}


def check_workdir(workdir: str, cfg) -> None:
  """app.UsageError if ``workdir`` holds a model of another config."""
  if not os.path.isfile(os.path.join(workdir, lm_config.CONFIG_FILE)):
    return
  try:
    saved, _ = lm_config.load_config(workdir)
  except (ValueError, TypeError, KeyError) as e:
    raise app.UsageError(f"{workdir}/{lm_config.CONFIG_FILE} is unreadable ({e}); "
                         "use another --workdir") from e
  old, new = lm_config.config_to_dict(saved), lm_config.config_to_dict(cfg)
  diff = sorted(k for k in new if old.get(k) != new[k])
  if diff:
    raise app.UsageError(
        f"--workdir={workdir} holds a model with another config (differs in "
        f"{', '.join(diff)}); pass the same model flags to resume it, or use another "
        "--workdir")


def sample(model, prompt: str, num_tokens: int, num_samples: int, *, seed: int,
           temperature: float, top_k: int | None) -> list[str]:
  """``num_samples`` continuations (bytes decoded as UTF-8) of ``prompt``."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from attnlib import data  # pylint: disable=import-outside-toplevel
  from attnlib import decoding  # pylint: disable=import-outside-toplevel
  if temperature == 0:
    num_samples = 1  # greedy: every sample would be the same
  tokens = np.tile(data.encode(prompt)[None], (num_samples, 1))
  out = decoding.generate(model, jax.numpy.asarray(tokens), num_tokens,
                          rng=jax.random.key(seed), temperature=temperature, top_k=top_k)
  return [data.decode(row) for row in np.asarray(out)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  check_flags()
  cfg = model_config()
  workdir = os.path.abspath(_WORKDIR.value)
  check_workdir(workdir, cfg)

  # Heavy imports after the flag checks, so a bad flag fails fast.
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from attnlib import data  # pylint: disable=import-outside-toplevel
  from attnlib import models  # pylint: disable=import-outside-toplevel
  from attnlib import training  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  try:
    tokens = data.load_corpus(_DATA.value or None, max_bytes=_MAX_BYTES.value)
    train_tokens, val_tokens = data.train_val_split(tokens, _VAL_FRACTION.value)
    for name, part in (("training", train_tokens), ("validation", val_tokens)):
      if len(part) < _SEQ_LEN.value + 1:
        raise ValueError(f"the {name} part has {len(part)} bytes, fewer than "
                         f"--seq_len + 1 = {_SEQ_LEN.value + 1}: use a larger file "
                         "or a smaller --seq_len")
  except ValueError as e:
    raise app.UsageError(f"cannot use the corpus: {e}") from e
  source = _DATA.value or "the Python standard library (.py files)"
  logging.info("data: %s, %d bytes (%d train, %d validation), loaded in %.1fs", source,
               len(tokens), len(train_tokens), len(val_tokens), time.perf_counter() - t0)

  model = models.TransformerLM(cfg, rngs=nnx.Rngs(_SEED.value))
  if _PARAM_DTYPE.value != "float32":
    training.cast_params(model, lm_config.PARAM_DTYPES[_PARAM_DTYPE.value])
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kinds = ",".join(lm_config.describe(layer) for layer in cfg.layers)
  logging.info("model: %d layers [%s], embed_dim %d, %d heads, %.2fM parameters (%s)",
               cfg.num_layers, kinds, cfg.embed_dim, cfg.num_heads, num_params / 1e6,
               _PARAM_DTYPE.value)
  warmup = _WARMUP_STEPS.value
  if warmup >= _STEPS.value:
    warmup = max(1, _STEPS.value // 10) if _STEPS.value > 1 else 0
    logging.warning("--warmup_steps=%d >= --steps=%d: warming up for %d steps",
                    _WARMUP_STEPS.value, _STEPS.value, warmup)
  schedule_args = dict(warmup_steps=warmup, total_steps=_STEPS.value)
  tx = training.make_optimizer(_LEARNING_RATE.value, weight_decay=_WEIGHT_DECAY.value,
                               **schedule_args)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  lm_config.save_config(workdir, cfg, train_flags())

  ckpt_dir = os.path.join(workdir, lm_config.CHECKPOINT_DIR)
  t0 = time.perf_counter()
  history = training.fit(
      model, optimizer, train_tokens, steps=_STEPS.value, batch_size=_BATCH_SIZE.value,
      seq_len=_SEQ_LEN.value, seed=_SEED.value, eval_tokens=val_tokens,
      eval_every=_EVAL_EVERY.value, eval_batches=_EVAL_BATCHES.value,
      checkpoint_dir=ckpt_dir, checkpoint_every=_CHECKPOINT_EVERY.value,
      lr_schedule=training.make_schedule(_LEARNING_RATE.value, **schedule_args),
      log_every=_LOG_EVERY.value)
  elapsed = time.perf_counter() - t0
  step = int(optimizer.step[...])
  if history.eval_loss:
    eval_loss = history.eval_loss[-1]
  else:  # the checkpoint (restored by fit) already reaches --steps
    eval_loss = training.evaluate(model, val_tokens, batch_size=_BATCH_SIZE.value,
                                  seq_len=_SEQ_LEN.value, num_batches=_EVAL_BATCHES.value,
                                  seed=_SEED.value)
  done = len(history.steps)
  if done:
    logging.info("trained steps %d-%d in %.1fs (%.0f tokens/s)", history.start_step + 1,
                 _STEPS.value, elapsed, history.tokens_per_second)
  if history.loss:
    print(f"train loss {history.loss[0]:.3f} -> {history.loss[-1]:.3f} "
          f"(steps {history.steps[0] + 1}-{history.steps[-1] + 1})")
  print(f"eval loss {eval_loss:.4f} nats/byte = {eval_loss / math.log(2):.3f} bits/byte "
        f"after {step} steps; checkpoint in {ckpt_dir}")
  if _SAMPLE_TOKENS.value:
    texts = sample(model, _SAMPLE_PROMPT.value, _SAMPLE_TOKENS.value, _NUM_SAMPLES.value,
                   seed=_SEED.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value)
    for i, text in enumerate(texts):
      print(f"--- sample {i + 1} (temperature {_TEMPERATURE.value}) ---")
      print(text)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
