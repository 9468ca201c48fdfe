"""experiments/aaren_timeseries.py: padding and last-step classification
(in process, NumPy checks), the JapaneseVowels loader and the script end to
end with tiny flags (both need the optional `experiments` extra, sktime:
skipped without it), and its clean exit when sktime is missing."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import aaren_timeseries as ats  # pylint: disable=wrong-import-position

TINY_MODEL = dict(embed_dim=8, num_heads=2, num_layers=1)
_last_step_logits = nnx.jit(ats.last_step_logits)
_forward = nnx.jit(lambda model, x: model(x))


def _run(tmp_path, *flags, pythonpath=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(ROOT)]))
  cmd = [sys.executable, str(ROOT / "experiments" / "aaren_timeseries.py"),
         f"--out={tmp_path}", *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


# --- no sktime needed --------------------------------------------------------


def test_pad_sequences_pads_at_the_end():
  rng = np.random.default_rng(0)
  seqs = [rng.normal(size=(n, 3)) for n in (2, 5, 1)]
  x, lengths = ats.pad_sequences(seqs, 6)
  assert x.shape == (3, 6, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(lengths, [2, 5, 1])
  for s, row in zip(seqs, x):
    np.testing.assert_allclose(row[:len(s)], s, rtol=1e-6)
    assert not row[len(s):].any()
  assert ats.pad_sequences(seqs)[0].shape == (3, 5, 3)
  with pytest.raises(ValueError, match="max_len=4"):
    ats.pad_sequences(seqs, 4)


def test_batches_cover_every_example_once_with_zero_weight_filler():
  batches = list(ats._batches(np.random.default_rng(0), 10, 4))  # pylint: disable=protected-access
  assert [len(i) for i, _ in batches] == [4, 4, 4]
  real = np.concatenate([i[w > 0] for i, w in batches])
  np.testing.assert_array_equal(np.sort(real), np.arange(10))
  np.testing.assert_array_equal(batches[-1][1], [1, 1, 0, 0])


def test_models_have_the_same_shape_and_near_equal_size():
  e, h, layers = 16, 4, 3
  counts = {}
  for name in ats.MODELS:
    cfg = ats.model_config(name, embed_dim=e, num_heads=h, num_layers=layers)
    assert (cfg.input_dim, cfg.num_classes, cfg.head) == (12, 9, "classification")
    abstract = nnx.eval_shape(lambda c=cfg: ats.AarenModel(c, rngs=nnx.Rngs(0)))
    counts[name] = ats.count_params(abstract)
  assert [c.kind for c in ats.model_config("aaren").layers] == ["aaren"] * 2
  assert all(c.kind == "softmax" and c.rope and c.is_causal
             for c in ats.model_config("transformer").layers)
  # Only difference: a query projection [E, H, D] against a learned query [H, D].
  d = e // h
  assert counts["transformer"] - counts["aaren"] == layers * (e * h * d - h * d)


@pytest.mark.parametrize("name", ats.MODELS)
def test_logits_come_from_the_true_last_step(name):
  """last_step_logits on end-padded sequences == the model on each unpadded
  sequence (whose __call__ reads its last step), and the padded steps do not
  matter."""
  b, t = 4, 9
  lengths = np.array([9, 1, 4, 4], np.int32)
  model = ats.AarenModel(ats.model_config(name, max_len=t, **TINY_MODEL), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(b, t, 12)).astype(np.float32)
  pad = np.arange(t)[None, :, None] >= lengths[:, None, None]
  x = np.where(pad, 0.0, x).astype(np.float32)
  noisy = np.where(pad, 100 * rng.normal(size=x.shape), x).astype(np.float32)
  changed = x.copy()
  changed[np.arange(b), lengths - 1] += 1.0  # the last real step does matter
  with jax.default_matmul_precision("highest"):
    # One call for the three variants; one unpadded forward per distinct length.
    out = np.asarray(_last_step_logits(model, jnp.asarray(np.concatenate([x, noisy, changed])),
                                      jnp.asarray(np.tile(lengths, 3))))
    unpadded = np.zeros_like(out[:b])
    for n in np.unique(lengths):
      rows = np.flatnonzero(lengths == n)
      unpadded[rows] = np.asarray(_forward(model, jnp.asarray(x[rows, :n])))
  logits, logits_noisy, logits_changed = out[:b], out[b:2 * b], out[2 * b:]
  assert logits.shape == (b, 9)
  np.testing.assert_allclose(logits, unpadded, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(logits_noisy, logits)
  assert np.all(np.abs(logits_changed - logits).max(-1) > 1e-4)


def test_script_exits_cleanly_without_sktime(tmp_path):
  fake = tmp_path / "fake"
  (fake / "sktime").mkdir(parents=True)
  (fake / "sktime" / "__init__.py").write_text(
      "raise ModuleNotFoundError('no sktime here', name='sktime')\n")
  result = _run(tmp_path / "out", "--epochs=1", "--seeds=1", pythonpath=[fake])
  assert result.returncode == 2, result.stderr[-3000:]
  assert "pip install -e '.[experiments]'" in result.stderr
  assert not (tmp_path / "out").exists()


# --- needs sktime (the `experiments` extra) -----------------------------------


def test_loader_shapes_labels_padding_and_normalisation():
  pytest.importorskip("sktime")
  train, test, info = ats.load_japanese_vowels()
  assert train.x.shape == (270, 29, 12) and test.x.shape == (370, 29, 12)
  assert train.x.dtype == np.float32 and info["max_len"] == 29
  for split, (lo, hi) in ((train, info["train_lengths"]), (test, info["test_lengths"])):
    assert split.lengths.min() == lo >= 7 and split.lengths.max() == hi <= 29
    assert sorted(set(split.y.tolist())) == list(range(9))
    pad = np.arange(29)[None, :] >= split.lengths[:, None]
    assert not split.x[pad].any()  # zeros after each sequence's end
    assert np.all(np.abs(split.x[np.arange(len(split.y)), split.lengths - 1]).sum(-1) > 0)
  assert info["test_lengths"] == [7, 29]
  real = train.x[np.arange(29)[None, :] < train.lengths[:, None]]  # [steps, 12]
  assert real.shape == (int(train.lengths.sum()), 12)
  np.testing.assert_allclose(real.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(real.std(0), 1.0, atol=1e-4)


def test_script_end_to_end_tiny(tmp_path):
  pytest.importorskip("sktime")
  result = _run(tmp_path, "--epochs=1", "--seeds=1", "--batch_size=64", "--eval_every=1",
                *(f"--{k}={v}" for k, v in TINY_MODEL.items()))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "aaren:" in result.stdout and "transformer:" in result.stdout  # parameter counts
  report = json.loads((tmp_path / "results.json").read_text())
  assert set(report["summary"]) == {"aaren", "transformer"}
  assert report["summary"]["transformer"]["params"] > report["summary"]["aaren"]["params"]
  for run in report["runs"]:
    assert 0.0 <= run["test_accuracy"] <= 1.0 and np.isfinite(run["final_train_loss"])
    assert run["test_accuracy_curve"] == [[1, run["test_accuracy"]]]
  table = (tmp_path / "results.md").read_text()
  assert "| aaren |" in table and "| transformer |" in table and " ± " in table
