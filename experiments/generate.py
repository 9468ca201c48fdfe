r"""Generates text with a model trained by ``experiments/train.py``.

Rebuilds the model from ``<workdir>/config.json``, restores the parameters of
the latest checkpoint in ``<workdir>/checkpoints`` (model only, no optimizer)
and prints the prompt followed by ``--max_new_tokens`` sampled bytes (decoded
as UTF-8; invalid bytes show as U+FFFD)::

  .venv/bin/python experiments/generate.py --workdir=/tmp/attnlib_train \
      --prompt='def ' --max_new_tokens=300 --temperature=0.8
"""

from __future__ import annotations

import math
import os
import sys

from absl import app
from absl import flags
from absl import logging

from configs import lm as lm_config  # experiments/configs (sys.path[0])

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/attnlib_train",
                               "The --workdir of a train.py run.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "The text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the top k bytes only.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _PROMPT.value:
    raise app.UsageError("--prompt must not be empty")
  if _MAX_NEW_TOKENS.value < 0:
    raise app.UsageError(f"--max_new_tokens={_MAX_NEW_TOKENS.value} must be >= 0")
  if not (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value >= 0):
    raise app.UsageError(f"--temperature={_TEMPERATURE.value} must be >= 0")
  if _TOP_K.value is not None and not 1 <= _TOP_K.value <= 256:
    raise app.UsageError(f"--top_k={_TOP_K.value} must lie in [1, 256] (or unset)")
  if _SEED.value < 0:
    raise app.UsageError(f"--seed={_SEED.value} must be >= 0")
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    cfg, _ = lm_config.load_config(workdir)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from attnlib import data  # pylint: disable=import-outside-toplevel
  from attnlib import decoding  # pylint: disable=import-outside-toplevel
  from attnlib import models  # pylint: disable=import-outside-toplevel
  from attnlib import training  # pylint: disable=import-outside-toplevel

  model = models.TransformerLM(cfg, rngs=nnx.Rngs(0))
  if cfg.param_dtype != jax.numpy.float32:
    training.cast_params(model, cfg.param_dtype)
  ckpt_dir = os.path.join(workdir, lm_config.CHECKPOINT_DIR)
  with training.Checkpointer(ckpt_dir) as ckpt:
    try:
      meta = ckpt.restore(model, step=_STEP.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  if meta is None:
    raise app.UsageError(f"no checkpoint in {ckpt_dir}")
  logging.info("restored the model of step %d from %s", meta["step"], ckpt_dir)

  prompt = data.encode(_PROMPT.value)[None]
  out = decoding.generate(model, jax.numpy.asarray(prompt), _MAX_NEW_TOKENS.value,
                          rng=jax.random.key(_SEED.value), temperature=_TEMPERATURE.value,
                          top_k=_TOP_K.value)
  new = np.asarray(out)[0, prompt.shape[1]:]
  logging.info("prompt: %d bytes, generated: %d bytes", prompt.shape[1], new.size)
  print(_PROMPT.value + data.decode(new))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
