r"""Time-series classification on JapaneseVowels: Aaren against a causal
Transformer of the same size ("Attention as an RNN", Feng et al. 2024).

Data: JapaneseVowels (UEA/UCR archive; shipped inside the `sktime` package,
the optional ``experiments`` extra: ``pip install -e '.[experiments]'``; read
from the package, no network): 270 train / 370 test utterances, 12 LPC
cepstrum channels, 7-29 steps each, 9 speakers (labels 0-8 here).

* Channels are normalised with the mean and std of the *train* split's real
  steps (the test split is never looked at for statistics).
* Variable length: every sequence is padded *at the end* with zeros to the
  longest length of both splits (29), and the classifier reads the last
  block's representation at each sequence's own last real step (index
  length - 1) through the model's head (`last_step_logits`). The models are
  causal, so that representation depends on the real steps only: it equals
  running the model on the unpadded sequence (Aaren's RNN view: the output
  after the last real token summarises the whole sequence), every sequence
  starts at position 0 (the Transformer's RoPE positions are those of the
  unpadded sequence), and no attention mask is needed. Padding at the start
  instead would put the pad steps inside every prefix the attention reads
  (neither layer has a key mask), so it is not used.

Models (`attnlib.models.aaren`): ``AarenConfig(input_dim=12,
head="classification", num_classes=9)`` with the default Aaren layers
(``layers=None``), and the same config with ``layers=AttentionConfig(
kind="softmax", rope=True)``: a causal pre-norm Transformer of the same width,
depth, heads and MLP. An Aaren layer has a learned query [H, D] instead of a
query projection [E, H, D], so it has slightly fewer parameters (both counts
are printed and saved).

Training: cross-entropy, `attnlib.training.make_optimizer` (AdamW, linear
warmup then cosine decay, global-norm clipping, decay on matrices only) for
--epochs over shuffled minibatches of --batch_size (the last, partial batch
of an epoch is padded with zero-weight examples so one compiled step serves
all); no validation split and no early stopping: the reported number is the
test accuracy after the last epoch, for each of --seeds seeds (the seed sets
the initialisation and the batch order), summarised as mean ± std
(population std, ddof=0) per model. --out receives results.json (settings,
parameter counts, per-seed accuracies and curves, summary) and results.md
(the table).

Examples:
  # the full comparison (CPU, a few minutes)
  python experiments/aaren_timeseries.py --out=experiments/results/aaren_timeseries
  # smoke test
  python experiments/aaren_timeseries.py --epochs=1 --seeds=1 --embed_dim=8 \
      --num_heads=2 --num_layers=1 --out=/tmp/aaren_ts
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlib.models.aaren import AarenConfig
from attnlib.models.aaren import AarenModel
from attnlib.nn.attention import AttentionConfig
from attnlib.training import make_optimizer

MODELS = ("aaren", "transformer")
NUM_CHANNELS = 12
NUM_CLASSES = 9
FLAGS = flags.FLAGS
INSTALL_HINT = ("JapaneseVowels is read from the `sktime` package: install the "
                "optional extra with  pip install -e '.[experiments]'  (or "
                "pip install sktime)")

# ---------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Split:
  """One split, padded: x [N, T, 12] float32 (zeros after each sequence's
  end), lengths [N] int32 (in 1..T), y [N] int32 (in 0..8)."""

  x: np.ndarray
  lengths: np.ndarray
  y: np.ndarray


def pad_sequences(seqs: list[np.ndarray],
                  max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """[T_i, F] arrays -> (x [N, max_len, F] with zeros after step T_i, lengths
  [N]); max_len defaults to the longest T_i."""
  lengths = np.array([len(s) for s in seqs], np.int32)
  if max_len is None:
    max_len = int(lengths.max())
  if lengths.min() < 1 or lengths.max() > max_len:
    raise ValueError(f"pad_sequences: lengths in [{lengths.min()}, {lengths.max()}] "
                     f"must lie in [1, max_len={max_len}]")
  x = np.zeros((len(seqs), max_len, seqs[0].shape[1]), np.float32)
  for i, s in enumerate(seqs):
    x[i, :len(s)] = s
  return x, lengths


def _raw_split(split: str) -> tuple[list[np.ndarray], np.ndarray]:
  """The sktime split as ([T_i, 12] float64 arrays, labels '1'..'9')."""
  try:
    from sktime.datasets import load_japanese_vowels  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  x, y = load_japanese_vowels(split=split, return_type="pd-multiindex")
  seqs = [g.to_numpy(np.float64) for _, g in x.groupby(level=0, sort=True)]
  if len(seqs) != len(y):
    raise ValueError(f"JapaneseVowels {split}: {len(seqs)} series for {len(y)} labels")
  return seqs, np.asarray(y)


def load_japanese_vowels() -> tuple[Split, Split, dict[str, Any]]:
  """(train, test, info): both splits padded at the end to the longest length
  of either (29), channels normalised with the train split's real steps, the
  labels '1'..'9' mapped to 0..8. info: the normalisation statistics and
  length ranges.

  Raises:
    ImportError: sktime (the ``experiments`` extra) is not installed.
  """
  train_seqs, train_y = _raw_split("TRAIN")
  test_seqs, test_y = _raw_split("TEST")
  steps = np.concatenate(train_seqs, axis=0)
  mean, std = steps.mean(0), steps.std(0)
  std = np.where(std > 0, std, 1.0)
  max_len = max(len(s) for s in train_seqs + test_seqs)
  classes = sorted(set(train_y.tolist()), key=int)
  index = {c: i for i, c in enumerate(classes)}

  def split(seqs, y):
    x, lengths = pad_sequences([(s - mean) / std for s in seqs], max_len)
    return Split(x, lengths, np.array([index[c] for c in y.tolist()], np.int32))

  info = dict(max_len=max_len, classes=classes, channel_mean=mean.tolist(),
              channel_std=std.tolist(),
              train_lengths=[int(min(map(len, train_seqs))), int(max(map(len, train_seqs)))],
              test_lengths=[int(min(map(len, test_seqs))), int(max(map(len, test_seqs)))])
  return split(train_seqs, train_y), split(test_seqs, test_y), info


# ---------------------------------------------------------------------------
# Models


def model_config(name: str, *, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2,
                 mlp_dim: int | None = None, max_len: int = 32) -> AarenConfig:
  """"aaren" (default Aaren layers) or "transformer" (causal softmax attention
  with RoPE), otherwise identical."""
  if name not in MODELS:
    raise ValueError(f"model_config: name={name!r} must be one of {MODELS}")
  layers = None if name == "aaren" else AttentionConfig(kind="softmax", rope=True)
  return AarenConfig(input_dim=NUM_CHANNELS, embed_dim=embed_dim, num_heads=num_heads,
                     num_layers=num_layers, mlp_dim=mlp_dim, layers=layers,
                     head="classification", num_classes=NUM_CLASSES, max_len=max_len)


def count_params(model: nnx.Module) -> int:
  return int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def last_step_logits(model: AarenModel, x: jax.Array, lengths: jax.Array) -> jax.Array:
  """x [B, T, F] padded at the end, lengths [B] -> logits [B, C] from the
  representation at step lengths - 1 (causal: independent of the padding)."""
  h = model.features(x)
  h = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.head(h).astype(jnp.float32)


def _loss(model, x, lengths, y, w):
  logits = last_step_logits(model, x, lengths)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


@nnx.jit
def _train_step(model, optimizer, x, lengths, y, w):
  loss, grads = nnx.value_and_grad(_loss)(model, x, lengths, y, w)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _predict(model, x, lengths):
  return jnp.argmax(last_step_logits(model, x, lengths), -1)


def accuracy(model: AarenModel, split: Split) -> float:
  pred = np.asarray(_predict(model, jnp.asarray(split.x), jnp.asarray(split.lengths)))
  return float(np.mean(pred == split.y))


def _batches(rng: np.random.Generator, n: int, batch_size: int):
  """One epoch: index arrays of batch_size and weights (0 for the filler that
  completes the last batch)."""
  perm = rng.permutation(n)
  for start in range(0, n, batch_size):
    idx = perm[start:start + batch_size]
    w = np.ones(batch_size, np.float32)
    if len(idx) < batch_size:
      w[len(idx):] = 0.0
      idx = np.concatenate([idx, perm[:batch_size - len(idx)]])
    yield idx, w


def train_and_eval(name: str, seed: int, train: Split, test: Split, *, epochs: int,
                   batch_size: int, lr: float, warmup_epochs: float, weight_decay: float,
                   grad_clip: float, eval_every: int, **model_kw) -> dict[str, Any]:
  """Trains one model from seed; returns its final test/train accuracy, loss
  curve and test-accuracy curve."""
  cfg = model_config(name, max_len=train.x.shape[1], **model_kw)
  model = AarenModel(cfg, rngs=nnx.Rngs(seed))
  steps_per_epoch = -(-len(train.y) // batch_size)
  total = epochs * steps_per_epoch
  warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
  tx = make_optimizer(lr, warmup_steps=warmup, total_steps=total, weight_decay=weight_decay,
                      grad_clip=grad_clip or None)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  xs, ls, ys = (jnp.asarray(a) for a in (train.x, train.lengths, train.y))
  losses, curve = [], []
  t0 = time.perf_counter()
  for epoch in range(1, epochs + 1):
    epoch_loss = 0.0
    for idx, w in _batches(rng, len(train.y), batch_size):
      loss = _train_step(model, optimizer, xs[idx], ls[idx], ys[idx], jnp.asarray(w))
      epoch_loss += float(loss) * float(w.sum())
    losses.append(epoch_loss / len(train.y))
    if epoch % eval_every == 0 or epoch == epochs:
      curve.append([epoch, accuracy(model, test)])
  return dict(model=name, seed=seed, params=count_params(model),
              test_accuracy=accuracy(model, test), train_accuracy=accuracy(model, train),
              final_train_loss=losses[-1], train_loss=losses, test_accuracy_curve=curve,
              seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# Report


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  out = {}
  for name in dict.fromkeys(r["model"] for r in runs):
    acc = [r["test_accuracy"] for r in runs if r["model"] == name]
    train_acc = [r["train_accuracy"] for r in runs if r["model"] == name]
    out[name] = dict(params=next(r["params"] for r in runs if r["model"] == name),
                     seeds=len(acc), mean=statistics.fmean(acc), std=statistics.pstdev(acc),
                     min=min(acc), max=max(acc), train_mean=statistics.fmean(train_acc),
                     accuracies=acc)
  return out


def markdown(summary: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
  lines = ["| model | params | test accuracy (%) mean ± std | min | max | seeds | "
           "train accuracy (%) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {s['params']:,} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | "
                 f"{100 * s['min']:.2f} | {100 * s['max']:.2f} | {s['seeds']} | "
                 f"{100 * s['train_mean']:.2f} |")
  keys = ("epochs", "batch_size", "lr", "warmup_epochs", "weight_decay", "grad_clip",
          "embed_dim", "num_heads", "num_layers", "mlp_dim")
  lines += ["", "JapaneseVowels (270 train / 370 test, 12 channels, lengths 7-29, "
            "9 classes); test accuracy after the last epoch, std over seeds (ddof=0). "
            "Settings: " + ", ".join(f"{k}={settings[k]}" for k in keys) + "."]
  return "\n".join(lines) + "\n"


def _define_flags() -> None:
  """The command-line flags (defined only when run as a script, so that
  importing this module, e.g. from tests, defines none)."""
  flags.DEFINE_integer("epochs", 50, "Training epochs per run.")
  flags.DEFINE_integer("batch_size", 32, "Minibatch size.")
  flags.DEFINE_float("lr", 1e-3, "Peak learning rate.")
  flags.DEFINE_float(
      "warmup_epochs", 5.0, "Linear warmup length, in epochs (clipped to leave "
      "at least one step of decay).")
  flags.DEFINE_float("weight_decay", 0.05, "AdamW decoupled weight decay.")
  flags.DEFINE_float("grad_clip", 1.0, "Global-norm clip (0: none).")
  flags.DEFINE_integer("embed_dim", 64, "Model width E.")
  flags.DEFINE_integer("num_heads", 4, "Attention heads per layer.")
  flags.DEFINE_integer("num_layers", 2, "Blocks.")
  flags.DEFINE_integer("mlp_dim", None, "SwiGLU hidden width (default 4 * E).")
  flags.DEFINE_integer("seeds", 5, "Seeds per model (0 .. seeds - 1).")
  flags.DEFINE_list("models", list(MODELS), f"Models to train, among {MODELS}.")
  flags.DEFINE_integer(
      "eval_every", 5, "Record test accuracy every this many epochs (for the curve "
      "in results.json only; the reported number is the last epoch's).")
  flags.DEFINE_string("out", "out/aaren_timeseries", "Directory for results.json/.md.")


def main(argv: list[str]) -> None:
  del argv
  bad = [m for m in FLAGS.models if m not in MODELS]
  if bad or not FLAGS.models:
    raise app.UsageError(f"--models={FLAGS.models}: each must be one of {MODELS}")
  for name in ("epochs", "batch_size", "seeds", "eval_every"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value} must be >= 1")
  try:
    train, test, info = load_japanese_vowels()
  except ImportError as e:
    print(f"aaren_timeseries: {e}", file=sys.stderr)
    sys.exit(2)
  model_kw = dict(embed_dim=FLAGS.embed_dim, num_heads=FLAGS.num_heads,
                  num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim)
  settings = dict(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
                  warmup_epochs=FLAGS.warmup_epochs, weight_decay=FLAGS.weight_decay,
                  grad_clip=FLAGS.grad_clip, seeds=FLAGS.seeds, models=FLAGS.models,
                  eval_every=FLAGS.eval_every, **model_kw)
  print(f"JapaneseVowels: train {train.x.shape} lengths {info['train_lengths']}, "
        f"test {test.x.shape} lengths {info['test_lengths']}, {NUM_CLASSES} classes")
  for name in FLAGS.models:
    cfg = model_config(name, max_len=info["max_len"], **model_kw)
    print(f"{name}: {count_params(AarenModel(cfg, rngs=nnx.Rngs(0))):,} parameters")
  t0 = time.perf_counter()
  runs = []
  for name in FLAGS.models:
    for seed in range(FLAGS.seeds):
      r = train_and_eval(name, seed, train, test, epochs=FLAGS.epochs,
                         batch_size=FLAGS.batch_size, lr=FLAGS.lr,
                         warmup_epochs=FLAGS.warmup_epochs, weight_decay=FLAGS.weight_decay,
                         grad_clip=FLAGS.grad_clip, eval_every=FLAGS.eval_every, **model_kw)
      runs.append(r)
      print(f"{name} seed {seed}: test {100 * r['test_accuracy']:.2f}%  train "
            f"{100 * r['train_accuracy']:.2f}%  loss {r['final_train_loss']:.4f}  "
            f"({r['seconds']:.1f}s)", flush=True)
  summary = summarize(runs)
  meta = dict(settings=settings, data=info, seconds=time.perf_counter() - t0,
              jax=jax.__version__, backend=jax.default_backend(),
              python=platform.python_version(), argv=sys.argv[1:])
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump(dict(meta=meta, summary=summary, runs=runs), f, indent=1)
  table = markdown(summary, settings)
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(table)
  print(table + f"total {meta['seconds']:.1f}s; written to {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
