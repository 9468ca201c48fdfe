"""experiments/mqar.py: the MQAR generator, the masked loss/accuracy, state
sizes, a learning check, and the script end to end (a subprocess)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import mqar  # pylint: disable=wrong-import-position

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _run(*flags, timeout=300):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / "mqar.py"), *flags],
                        capture_output=True, text=True, timeout=timeout, env=ENV, check=False)


# ---------------------------------------------------------------------- data


@pytest.mark.parametrize("placement", mqar.PLACEMENTS)
@pytest.mark.parametrize("seq_len,num_pairs,vocab_size",
                         [(8, 2, 9), (32, 8, 64), (40, 3, 20), (64, 16, 40)])
def test_generator_invariants(placement, seq_len, num_pairs, vocab_size):
  batch = mqar.mqar_batch(np.random.default_rng(0), 50, seq_len, num_pairs, vocab_size,
                          placement=placement)
  x, y, mask = batch["inputs"], batch["targets"], batch["mask"]
  assert x.shape == y.shape == mask.shape == (50, seq_len)
  assert x.dtype == y.dtype == np.int32 and mask.dtype == bool
  keys, values = mqar.vocab_split(vocab_size)
  is_key = (x >= keys.start) & (x < keys.stop)
  is_value = (x >= values.start) & (x < values.stop)
  n2 = 2 * num_pairs
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])     # targets are the next token
  for row in range(50):
    k, v = x[row, 0:n2:2], x[row, 1:n2:2]
    assert is_key[row, 0:n2:2].all() and is_value[row, 1:n2:2].all()
    assert len(set(k)) == num_pairs and len(set(v)) == num_pairs   # unambiguous pairs
    pair = dict(zip(k.tolist(), v.tolist()))
    # The mask marks exactly the query keys: keys after the pairs region.
    want = is_key[row] & (np.arange(seq_len) >= n2)
    np.testing.assert_array_equal(mask[row], want)
    qpos = np.flatnonzero(mask[row])
    assert len(qpos) == num_pairs and ((qpos - n2) % 2 == 0).all()
    assert sorted(x[row, qpos].tolist()) == sorted(k.tolist())        # each key once
    for t in qpos:  # the target is the value paired with that key earlier
      assert y[row, t] == pair[int(x[row, t])] == x[row, t + 1]
    rest = np.ones(seq_len, bool)
    rest[:n2] = False
    rest[qpos] = rest[qpos + 1] = False
    assert (x[row, rest] == mqar.FILLER).all()


def test_generator_is_deterministic_per_seed():
  args = (16, 32, 4, 30)
  a = mqar.mqar_batch(np.random.default_rng(7), *args)
  b = mqar.mqar_batch(np.random.default_rng(7), *args)
  c = mqar.mqar_batch(np.random.default_rng(8), *args)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_power_law_places_queries_nearer_the_pairs():
  def mean_slot(placement):
    batch = mqar.mqar_batch(np.random.default_rng(1), 400, 128, 4, 64, placement=placement)
    return (np.nonzero(batch["mask"])[1] - 8).mean() / 2
  # Uniform: slots uniform over 0..59 (mean ~29.5); the power law favours early slots.
  assert abs(mean_slot("uniform") - 29.5) < 2.0
  assert mean_slot("power_law") < 20.0


def test_mixed_batch_splits_the_batch_over_num_pairs():
  batch = mqar.mixed_batch(np.random.default_rng(0), 10, [2, 4, 8], seq_len=32, vocab_size=64)
  assert batch["inputs"].shape == (10, 32)
  np.testing.assert_array_equal(batch["mask"].sum(1), [2] * 4 + [4] * 3 + [8] * 3)


@pytest.mark.parametrize("seq_len,num_pairs,vocab_size,match",
                         [(15, 4, 64, "seq_len"), (32, 0, 64, "num_pairs"),
                          (64, 8, 15, "vocab_size")])
def test_bad_task_raises(seq_len, num_pairs, vocab_size, match):
  with pytest.raises(ValueError, match=match):
    mqar.mqar_batch(np.random.default_rng(0), 2, seq_len, num_pairs, vocab_size)


# ----------------------------------------------------------- loss / metric


def test_masked_metrics_match_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 9, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(4, 9))
  mask = rng.random((4, 9)) < 0.4
  targets[0, 0], mask[0, 0] = int(np.argmax(logits[0, 0])), True   # at least one right
  loss, acc = mqar.masked_metrics(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  lg = logits.astype(np.float64)
  log_z = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  ce = log_z - np.take_along_axis(lg, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), ce[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(acc), (lg.argmax(-1) == targets)[mask].mean(), rtol=1e-6)
  # An empty mask gives zeros, not NaN.
  loss, acc = mqar.masked_metrics(jnp.asarray(logits), jnp.asarray(targets),
                                  jnp.zeros((4, 9), bool))
  assert float(loss) == 0.0 and float(acc) == 0.0


def test_mqar_loss_ignores_unmasked_positions():
  batch = mqar.mqar_batch(np.random.default_rng(0), 3, 16, 2, 20)
  # A "model" right at the query positions only and very wrong elsewhere.
  right = jax.nn.one_hot(batch["targets"], 20) * 50.0
  logits = np.where(batch["mask"][..., None], right, -right)
  model = lambda tokens: jnp.asarray(logits)  # noqa: E731
  assert float(mqar.mqar_loss(model, batch["inputs"], batch["targets"], batch["mask"])) < 1e-6


# ------------------------------------------------------------- state sizes


def test_state_sizes_follow_the_formulas():
  t, e, h = 32, 64, 2
  models = {v.label: v for v in mqar.variants(
      mqar.KINDS, seq_len=t, vocab_size=64, embed_dim=e, num_heads=h, num_layers=2,
      linear_head_dims=(4, 8), windows=(4,), based_window=4, based_head_dim=8)}
  size = lambda label: mqar.state_size(models[label].config, t)  # noqa: E731
  d = e // h
  assert size("softmax") == 2 * (2 * t * h * d)                 # KV cache, 2 layers
  assert size("linear(d=4)") == 2 * (h * 4 * 4)                 # elu+1: K = d
  assert size("linear(d=8)") == 2 * (h * 8 * 8)
  assert size("window(w=4)") == 2 * (4 * 2 * h * d)
  assert size("aaren") == 2 * (h * (d + 2))
  assert size(f"sigmoid(b={-math.log(t):.2f})") == size("softmax")
  # BASED: a window of 4 plus Taylor linear attention (1 + 8 + 64 features), head dim 8.
  assert size("based(w=4,d=8)") == 4 * 2 * h * 8 + h * 73 * 8
  layers = models["based(w=4,d=8)"].config.layers
  assert [c.kind for c in layers] == ["sliding_window", "linear"]
  assert layers[1].feature_map == "taylor"


# --------------------------------------------------------------- learning


def test_softmax_learns_easy_mqar():
  """A tiny softmax model recalls clearly better than guessing among the
  sequence's values (chance 1/N = 0.5) after a few seconds of training. (The
  jump from the guessing plateau to recall comes at a seed-dependent step,
  and in the full suite also moved with the process's state: seeds 0, 1 and 2
  each reach 1.0 by step 800 when run alone, seed 2 only 0.74 by step 400;
  one full-suite run had seed 0 at 0.66 after 400 steps.)"""
  (v,) = mqar.variants(["softmax"], seq_len=16, vocab_size=24, embed_dim=64, num_heads=2,
                       num_layers=2)
  result = mqar.train_and_eval(v.config, train_pairs=[2], eval_pairs=[2], seq_len=16,
                               steps=800, batch_size=64, eval_examples=128,
                               learning_rate=3e-3, seed=0)
  assert result["eval"][2]["accuracy"] > 0.8, result


# ------------------------------------------------------------- end to end


def test_script_writes_table_and_plot(tmp_path):
  result = _run("--steps=3", "--num_pairs=2", "--num_pairs=4", "--seq_len=24",
                "--kinds=softmax,linear,based,aaren", "--linear_head_dims=4", "--seeds=1",
                "--train_on=each", "--eval_examples=8", "--batch_size=4", f"--out={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "results.json").read_text())
  rows = report["rows"]
  assert report["settings"]["seq_len"] == 24 and report["settings"]["train_on"] == "each"
  assert {(r["model"], r["num_pairs"]) for r in rows} == {
      (m, n) for m in ("softmax", "linear(d=4)", "based(w=4,d=8)", "aaren") for n in (2, 4)}
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["state_size"] > 0 for r in rows)
  table = (tmp_path / "results.md").read_text()
  assert "| softmax |" in table and "N=4" in table and "chance" in table
  assert len((tmp_path / "results.csv").read_text().splitlines()) == len(rows) + 1
  png = (tmp_path / "plot.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) < 200_000


@pytest.mark.parametrize("flags,message", [
    (["--kinds=softmax,bogus"], "--kinds: unknown kind(s) ['bogus']"),
    (["--num_pairs=9", "--seq_len=32"], "--num_pairs=9: seq_len=32 must be >= 4 * num_pairs"),
    (["--windows=4,x"], "--windows=4,x: expected integers"),
])
def test_bad_flag_exits_nonzero_with_a_message(flags, message, tmp_path):
  result = _run(*flags, f"--out={tmp_path}", timeout=120)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "results.json").exists()
