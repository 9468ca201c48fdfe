"""Tests for attnlib.training.checkpoint.Checkpointer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlib import data
from attnlib import training
from tests.training import TOKENS
from tests.training import TinyLM
from tests.training import assert_same_state
from tests.training import pure_state
from tests.training import setup


def _trained(seed=0, steps=3):
  model, optimizer, _ = setup(seed)
  for s in range(steps):
    training.train_step(model, optimizer, *data.batch_at(TOKENS, s, 4, 16))
  return model, optimizer


def test_round_trip_restores_everything(tmp_path):
  model, optimizer = _trained()
  rng = jax.random.key(42)
  with training.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None and ckpt.restore(model, optimizer) is None
    assert ckpt.save(3, model, optimizer, rng=rng, metadata={"seed": 5, "note": "x"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]

  fresh_model, fresh_optimizer, _ = setup(seed=9)  # other init, other dropout key
  assert not np.array_equal(fresh_model.out.kernel[...], model.out.kernel[...])
  with training.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    meta = ckpt.restore(fresh_model, fresh_optimizer)
  assert meta["step"] == 3 and meta["seed"] == 5 and meta["note"] == "x"
  assert jax.random.key_impl(meta["rng"]) == jax.random.key_impl(rng)
  np.testing.assert_array_equal(jax.random.key_data(meta["rng"]), jax.random.key_data(rng))
  # Parameters, the int counter, the dropout stream (key and count), the
  # optimizer's step and the whole optax state (moments, counts), bit for bit.
  assert_same_state(fresh_model, model)
  assert_same_state(fresh_optimizer, optimizer)
  assert int(fresh_optimizer.step[...]) == 3 and int(fresh_model.calls[...]) == 3
  state = pure_state(fresh_optimizer)
  assert any("mu" in k for k in state) and any("nu" in k for k in state)
  assert jnp.issubdtype(fresh_model.dropout.rngs.key[...].dtype, jax.dtypes.prng_key)
  # Training on from both gives the same losses.
  batch = data.batch_at(TOKENS, 3, 4, 16)
  assert (float(training.train_step(model, optimizer, *batch))
          == float(training.train_step(fresh_model, fresh_optimizer, *batch)))
  assert_same_state(fresh_model, model)


def test_restore_model_only_and_by_step(tmp_path):
  model, optimizer = _trained(steps=2)
  with training.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, model, optimizer)
    training.train_step(model, optimizer, *data.batch_at(TOKENS, 2, 4, 16))
    ckpt.save(3, model)  # model only
    assert ckpt.all_steps() == [2, 3]
    fresh = TinyLM(rngs=nnx.Rngs(5))
    meta = ckpt.restore(fresh)  # latest, no optimizer: e.g. for generation
    assert meta["step"] == 3 and meta["rng"] is None
    assert_same_state(fresh, model)
    with pytest.raises(ValueError, match="no optimizer state"):
      ckpt.restore(fresh, setup(1)[1])
    fresh_model, fresh_optimizer, _ = setup(7)
    assert ckpt.restore(fresh_model, fresh_optimizer, step=2)["step"] == 2
    assert int(fresh_optimizer.step[...]) == 2
    with pytest.raises(ValueError, match=r"step=9 is not among the saved steps \[2, 3\]"):
      ckpt.restore(fresh_model, step=9)


def test_keeps_last_k(tmp_path):
  model, optimizer = _trained(steps=1)
  with training.Checkpointer(tmp_path, keep=2) as ckpt:
    for step in range(1, 6):
      ckpt.save(step, model, optimizer)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]


def test_metadata_is_json(tmp_path):
  model, _ = _trained(steps=1)
  with training.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, model, metadata={"seed": 3})
  meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
  assert meta == {"step": 1, "seed": 3, "items": ["model"]}


def test_bf16_round_trip(tmp_path):
  model = training.cast_params(TinyLM(rngs=nnx.Rngs(0)))
  tx = training.make_optimizer(1e-2, warmup_steps=0, total_steps=5)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  training.train_step(model, optimizer, *data.batch_at(TOKENS, 0, 4, 16))
  with training.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, model, optimizer)
  fresh = training.cast_params(TinyLM(rngs=nnx.Rngs(1)))
  fresh_optimizer = nnx.Optimizer(fresh, tx, wrt=nnx.Param)
  with training.Checkpointer(tmp_path) as ckpt:
    ckpt.restore(fresh, fresh_optimizer)
  assert fresh.out.kernel.dtype == jnp.bfloat16
  assert_same_state(fresh, model)
  assert_same_state(fresh_optimizer, optimizer)


def test_rejects(tmp_path):
  model, optimizer = _trained(steps=1)
  with training.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="step=-1"):
      ckpt.save(-1, model)
    with pytest.raises(ValueError, match="typed key"):
      ckpt.save(1, model, rng=jax.random.PRNGKey(0))
    ckpt.save(1, model, optimizer)
    ckpt.wait()
    # The abstract target is checked against the stored metadata.
    with pytest.raises(ValueError, match=r"model leaf 'embed/embedding' is \(256, 32\) "
                       r"float32 in checkpoint 1 .*, but \(256, 8\) float32 in the target"):
      ckpt.restore(TinyLM(rngs=nnx.Rngs(0), embed_dim=8))
    with pytest.raises(ValueError, match=r"the model state does not match checkpoint 1 .*: "
                       r"not in the checkpoint \['linear/bias', 'linear/kernel'\]"):
      wrapped = nnx.Dict(linear=nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
      ckpt.restore(wrapped)
    bf16 = training.cast_params(TinyLM(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'embed/embedding' is \(256, 32\) float32 .* but "
                       r"\(256, 32\) bfloat16"):
      ckpt.restore(bf16)
  with pytest.raises(ValueError, match="keep=0"):
    training.Checkpointer(tmp_path, keep=0)


def test_quiet_orbax_logs(tmp_path):
  import logging as std_logging
  from absl import logging
  from attnlib.training import checkpoint

  def record(level, path):
    return std_logging.LogRecord("absl", level, path, 1, "msg", None, None)

  training.Checkpointer(tmp_path).close()  # quiet=True by default
  logger = logging.get_absl_logger()
  assert not logger.filter(record(std_logging.INFO, "/x/orbax/checkpoint/manager.py"))
  assert logger.filter(record(std_logging.WARNING, "/x/orbax/checkpoint/manager.py"))
  assert logger.filter(record(std_logging.INFO, "/x/attnlib/training/loop.py"))
  checkpoint.quiet_orbax_logs(False)
  try:
    assert logger.filter(record(std_logging.INFO, "/x/orbax/checkpoint/manager.py"))
  finally:
    checkpoint.quiet_orbax_logs()
