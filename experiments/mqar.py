r"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023) swept over
attention kinds and state sizes.

The task. The vocabulary [0, V) is split into a filler token 0, keys
[1, 1 + V_k) and values [1 + V_k, V), V_k = (V - 1) // 2. A sequence of
length T holds N key-value pairs ``k_1 v_1 k_2 v_2 ... k_N v_N`` (distinct
keys, distinct values, drawn uniformly) in positions [0, 2N), then a query
region [2N, T) cut into (T - 2N) // 2 two-token slots. Every key is queried
once: N slots are drawn, and slot j holds (a key, its value) in a random
order of the pairs; the other positions hold the filler 0. The model reads
the whole sequence (causal) and is scored at the query-key positions only: the
target there is the next token, the value paired with that key earlier in the
sequence. Loss (cross-entropy) and accuracy (argmax over the whole vocabulary)
are averaged over those masked positions. T >= 4N is required.

Query placement (--placement): "uniform" draws the N slots uniformly without
replacement; "power_law" draws them as Zoology does, slot j (0-based) with
weight (j + 1) ** (power_a - 1) (sequential sampling without replacement,
i.e. queries tend to sit close to the pairs; --power_a = 0.01 as in Zoology).
The default is uniform: a query's distance from its pair is then spread over
the whole query region, which makes the sliding-window widths easy to read.

The sweep. For each model in --kinds (expanded into variants: linear over
--linear_head_dims, window over --windows) and each of --seeds seeds, a fresh
2-layer `attnlib.models.TransformerLM` (width --embed_dim, --num_heads heads,
SwiGLU MLPs of --mlp_dim, tied embeddings, no positional embedding besides
RoPE) is trained with AdamW (`attnlib.training.make_optimizer`: warmup +
cosine, clipping, weight decay on matrices) for --steps steps on fresh batches
of MQAR sequences, then evaluated on --eval_examples held-out sequences (a
separate RNG stream) for each N in --num_pairs. With --train_on=mix (the
default, Zoology's protocol of training on a mixture of kv-pair counts) every
training batch mixes all the --num_pairs in equal parts and one model is
evaluated at each N; with --train_on=each a separate model is trained per N
(len(--num_pairs) times the compute). Models:

  softmax      causal softmax attention with RoPE in both layers.
  linear       causal linear attention (--feature_map, no decay,
               RoPE before the feature map, RMSNorm on each head's output
               when --linear_output_norm), head dim d from --linear_head_dims
               (state per layer: heads * feature_dim(d) * d).
  window       causal sliding-window softmax with RoPE, left reach w from
               --windows (state per layer: w * 2 * kv_heads * head_dim).
  based        BASED hybrid (`based_layers`, linear_first=False: layer 0 a
               sliding window of --based_window, layer 1 global linear
               attention with the 2nd-order Taylor feature map, head dim
               --based_head_dim, output norm as linear).
  sigmoid      sigmoid attention with RoPE and a fixed bias (--sigmoid_bias,
               default -log(T)).
  aaren        Aaren (`attention_scan`: a learned, input-independent query
               per head; state per layer: heads * (head_dim + 2)).

State size is the number of floats of the decoding cache of one sequence at
length T, summed over the layers (`TransformerLM.init_cache(1, T)`): for
softmax and sigmoid the KV cache that grows with T (2 * T * kv_heads *
head_dim per layer), for the others a constant.

Outputs in --out: results.json (settings and one row per run), results.csv,
results.md (a table: mean accuracy over seeds per model and N, with state
size and chance level 1/N = guessing among the N values of the sequence) and
plot.png (accuracy against N per model; accuracy against state size for the
linear and window variants, one line per N).

Example (the CPU sweep saved in experiments/results/mqar/: the defaults, i.e.
T=32, V=64, N in {2, 4, 8}, 600 steps of batch 64, E=64, 2 heads, linear
head dims {4, 8, 16}, windows {4, 8, 16}; ~12 minutes on 2 shared CPU cores):
  python experiments/mqar.py --out=experiments/results/mqar
A larger sweep closer to Zoology's (not run here: on CPU a softmax model at
T=64, V=64 was still on the guess-a-value-of-the-sequence plateau after 800
steps, so larger settings need many more steps, i.e. an accelerator):
  python experiments/mqar.py --seq_len=128 --vocab_size=256 --num_pairs=4 \
      --num_pairs=8 --num_pairs=16 --num_pairs=32 --linear_head_dims=8,16,32 \
      --windows=8,16,32 --based_window=8 --steps=5000 --seeds=3 --out=out/mqar
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlib.models import lm as lm_lib
from attnlib.nn import AttentionConfig
from attnlib import training

KINDS = ("softmax", "linear", "window", "based", "sigmoid", "aaren")
PLACEMENTS = ("uniform", "power_law")
FILLER = 0

def _define_flags() -> None:
  """Defines the flags; only when this file runs as a script, so that tests
  can import it next to other binaries that define flags of the same names."""
  g = globals()
  g["_KINDS"] = flags.DEFINE_list("kinds", list(KINDS), f"Models to sweep, a subset of {KINDS}.")
  g["_NUM_PAIRS"] = flags.DEFINE_multi_integer("num_pairs", [2, 4, 8],
                                          "Numbers of key-value pairs N (needs --seq_len >= 4N).")
  g["_SEQ_LEN"] = flags.DEFINE_integer("seq_len", 32, "Sequence length T.")
  g["_VOCAB"] = flags.DEFINE_integer("vocab_size", 64,
                                "Vocabulary V: filler 0, (V-1)//2 keys, the rest values.")
  g["_PLACEMENT"] = flags.DEFINE_enum("placement", "uniform", PLACEMENTS, "Query slot placement.")
  g["_POWER_A"] = flags.DEFINE_float("power_a", 0.01, "power_law placement exponent (Zoology's).")
  g["_TRAIN_ON"] = flags.DEFINE_enum(
      "train_on", "mix", ["mix", "each"],
      "mix: one model per (model, seed) trained on batches mixing every --num_pairs and "
      "evaluated on each (Zoology's protocol); each: a model per (model, N, seed).")
  g["_STEPS"] = flags.DEFINE_integer("steps", 600, "Training steps per model.")
  g["_BATCH"] = flags.DEFINE_integer("batch_size", 64, "Training batch size.")
  g["_EVAL"] = flags.DEFINE_integer("eval_examples", 256, "Held-out sequences per evaluation.")
  g["_EMBED"] = flags.DEFINE_integer("embed_dim", 64, "Model width E.")
  g["_HEADS"] = flags.DEFINE_integer("num_heads", 2, "Attention heads (head_dim E / heads).")
  g["_MLP"] = flags.DEFINE_integer("mlp_dim", None, "SwiGLU hidden width (default 2 * embed_dim).")
  g["_LAYERS"] = flags.DEFINE_integer("num_layers", 2, "Blocks per model.")
  g["_LR"] = flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.")
  g["_WD"] = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
  g["_WARMUP"] = flags.DEFINE_float("warmup_fraction", 0.1, "Warmup steps as a fraction of --steps.")
  g["_SEEDS"] = flags.DEFINE_integer("seeds", 1, "Seeds per configuration (0 .. seeds-1).")
  g["_FEATURE_MAP"] = flags.DEFINE_enum("feature_map", "elu_plus_one",
                                   ["identity", "elu_plus_one", "relu", "taylor"],
                                   "linear: the feature map.")
  g["_LINEAR_DIMS"] = flags.DEFINE_list("linear_head_dims", ["4", "8", "16"],
                                   "linear: head dims swept (state size).")
  g["_LINEAR_NORM"] = flags.DEFINE_bool("linear_output_norm", True,
                                   "linear/based: RMSNorm on each head's output (the op is "
                                   "unnormalised linear attention).")
  g["_WINDOWS"] = flags.DEFINE_list("windows", ["4", "8", "16"], "window: left reaches swept.")
  g["_BASED_WINDOW"] = flags.DEFINE_integer("based_window", 4, "based: sliding-window reach.")
  g["_BASED_HEAD_DIM"] = flags.DEFINE_integer("based_head_dim", 8,
                                         "based: head dim of both layers (Taylor: 1+d+d^2 features).")
  g["_SIGMOID_BIAS"] = flags.DEFINE_float("sigmoid_bias", None, "sigmoid: fixed bias (default -log T).")
  g["_OUT"] = flags.DEFINE_string("out", "out/mqar", "Directory for results.{json,csv,md} and plot.png.")


# ---------------------------------------------------------------------- data


def vocab_split(vocab_size: int) -> tuple[range, range]:
  """(keys, values) token ranges of a vocabulary of ``vocab_size``."""
  nk = (vocab_size - 1) // 2
  return range(1, 1 + nk), range(1 + nk, vocab_size)


def check_task(seq_len: int, num_pairs: int, vocab_size: int) -> None:
  """Raises ValueError unless sequences of (seq_len, num_pairs, vocab_size)
  can be built."""
  keys, values = vocab_split(vocab_size)
  if num_pairs < 1:
    raise ValueError(f"num_pairs={num_pairs} must be >= 1")
  if seq_len < 4 * num_pairs:
    raise ValueError(f"seq_len={seq_len} must be >= 4 * num_pairs = {4 * num_pairs} "
                     "(N pairs, then N query slots of two tokens)")
  if num_pairs > min(len(keys), len(values)):
    raise ValueError(f"num_pairs={num_pairs} exceeds the {len(keys)} keys / {len(values)} "
                     f"values of vocab_size={vocab_size}")


def _top_n(rng: np.random.Generator, logits: np.ndarray, n: int) -> np.ndarray:
  """Indices of n draws without replacement per row, P(i) ~ exp(logits[i])
  sequentially (the Gumbel top-n trick), in draw order."""
  g = logits + rng.gumbel(size=logits.shape)
  return np.argsort(-g, axis=-1, kind="stable")[:, :n]


def mqar_batch(rng: np.random.Generator, batch_size: int, seq_len: int, num_pairs: int,
               vocab_size: int, placement: str = "uniform", power_a: float = 0.01
               ) -> dict[str, np.ndarray]:
  """A batch of MQAR sequences (see the module docstring).

  Returns:
    dict with ``inputs`` int32 [B, T] (the sequences), ``targets`` int32 [B, T]
    (targets[:, t] = inputs[:, t + 1], 0 at t = T - 1) and ``mask`` bool [B, T]
    (True exactly at the N query-key positions of each row).
  """
  check_task(seq_len, num_pairs, vocab_size)
  if placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r} must be one of {PLACEMENTS}")
  b, n, t = batch_size, num_pairs, seq_len
  keys, values = vocab_split(vocab_size)
  k = _top_n(rng, np.zeros((b, len(keys))), n) + keys.start      # [B, N] distinct
  v = _top_n(rng, np.zeros((b, len(values))), n) + values.start  # [B, N] distinct
  seq = np.full((b, t), FILLER, np.int64)
  seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = k, v
  slots = (t - 2 * n) // 2
  if placement == "uniform":
    weights = np.zeros((b, slots))
  else:
    weights = np.broadcast_to((power_a - 1.0) * np.log(np.arange(1, slots + 1)), (b, slots))
  chosen = _top_n(rng, weights, n)                              # [B, N] slot indices
  order = _top_n(rng, np.zeros((b, n)), n)                      # which pair each slot asks
  rows = np.arange(b)[:, None]
  pos = 2 * n + 2 * chosen                                      # query-key positions
  seq[rows, pos] = k[rows, order]
  seq[rows, pos + 1] = v[rows, order]
  mask = np.zeros((b, t), bool)
  mask[rows, pos] = True
  targets = np.zeros((b, t), np.int64)
  targets[:, :-1] = seq[:, 1:]
  return {"inputs": seq.astype(np.int32), "targets": targets.astype(np.int32), "mask": mask}


# ---------------------------------------------------------- loss and metric


def masked_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, accuracy) over the positions where ``mask`` is True
  (logits [B, T, V], targets int [B, T], mask bool [B, T]); 0 when the mask is
  empty. Accuracy is argmax(logits) == target."""
  m = mask.astype(jnp.float32)
  count = jnp.maximum(m.sum(), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (ce * m).sum() / count, (correct * m).sum() / count


def mqar_loss(model: nnx.Module, inputs: jax.Array, targets: jax.Array, mask: jax.Array
              ) -> jax.Array:
  return masked_metrics(model(inputs), targets, mask)[0]


@nnx.jit
def _train_step(model, optimizer, inputs, targets, mask):
  loss, grads = nnx.value_and_grad(mqar_loss)(model, inputs, targets, mask)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _eval_step(model, inputs, targets, mask):
  return masked_metrics(model(inputs), targets, mask)


# --------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Variant:
  """One model of the sweep: its family (a --kinds entry), label, swept
  parameter (head dim for linear, window for window) and LM config."""
  family: str
  label: str
  param: int | None
  config: lm_lib.LMConfig


def _linear(feature_map: str, output_norm: bool) -> AttentionConfig:
  return AttentionConfig(kind="linear", feature_map=feature_map, rope=True,
                         output_norm=output_norm)


def variants(kinds, *, seq_len, vocab_size, embed_dim, num_heads, num_layers, mlp_dim=None,
             feature_map="elu_plus_one", linear_head_dims=(8, 16, 32),
             linear_output_norm=True, windows=(8, 16, 32), based_window=8,
             based_head_dim=8, sigmoid_bias=None) -> list[Variant]:
  """The models of the sweep for ``kinds`` (in the order of KINDS' entries
  within each kind as given)."""
  base = dict(vocab_size=vocab_size, embed_dim=embed_dim, num_heads=num_heads,
              mlp_dim=2 * embed_dim if mlp_dim is None else mlp_dim, max_len=seq_len)
  def cfg(layers, **kw):
    return lm_lib.LMConfig(**{**base, **kw}, layers=lm_lib.layer_pattern(num_layers, layers))
  out = []
  for kind in kinds:
    if kind == "softmax":
      out.append(Variant(kind, "softmax", None, cfg(AttentionConfig(kind="softmax", rope=True))))
    elif kind == "linear":
      for d in linear_head_dims:
        out.append(Variant(kind, f"linear(d={d})", d,
                           cfg(_linear(feature_map, linear_output_norm), head_dim=d)))
    elif kind == "window":
      for w in windows:
        out.append(Variant(kind, f"window(w={w})", w, cfg(AttentionConfig(
            kind="sliding_window", window=w, rope=True))))
    elif kind == "based":
      layers = tuple(
          dataclasses.replace(c, output_norm=linear_output_norm) if c.kind == "linear" else c
          for c in lm_lib.based_layers(num_layers, window=based_window, linear_first=False))
      out.append(Variant(kind, f"based(w={based_window},d={based_head_dim})", None,
                         lm_lib.LMConfig(**base, head_dim=based_head_dim, layers=layers)))
    elif kind == "sigmoid":
      bias = -math.log(seq_len) if sigmoid_bias is None else sigmoid_bias
      out.append(Variant(kind, f"sigmoid(b={bias:.2f})", None,
                         cfg(AttentionConfig(kind="sigmoid", bias=float(bias), rope=True))))
    elif kind == "aaren":
      out.append(Variant(kind, "aaren", None, cfg(AttentionConfig(kind="aaren"))))
    else:
      raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
  return out


def state_size(config: lm_lib.LMConfig, seq_len: int) -> int:
  """Floats in the decoding cache of one sequence of length seq_len, summed
  over layers (integer lengths not counted)."""
  model = nnx.eval_shape(lambda: lm_lib.TransformerLM(config, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(1, seq_len))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(cache)
                 if jnp.issubdtype(x.dtype, jnp.floating)))


# --------------------------------------------------------------- train / eval


def mixed_batch(rng: np.random.Generator, batch_size: int, pairs, **task
                ) -> dict[str, np.ndarray]:
  """A batch of ``batch_size`` sequences split as evenly as possible over the
  numbers of pairs in ``pairs`` (concatenated in that order)."""
  sizes = [len(x) for x in np.array_split(np.arange(batch_size), len(pairs))]
  parts = [mqar_batch(rng, b, num_pairs=n, **task) for n, b in zip(pairs, sizes) if b]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def train_and_eval(config: lm_lib.LMConfig, *, train_pairs, eval_pairs, seq_len: int,
                   steps: int, batch_size: int, eval_examples: int, learning_rate: float,
                   seed: int, weight_decay: float = 0.1, warmup_fraction: float = 0.1,
                   placement: str = "uniform", power_a: float = 0.01) -> dict[str, Any]:
  """Trains a fresh model on MQAR batches mixing ``train_pairs`` (see
  `mixed_batch`) and evaluates it on ``eval_examples`` held-out sequences
  (another RNG stream) for each N in ``eval_pairs``.

  Returns:
    {"train_loss": mean of the last 10% of steps' losses, "seconds": wall
     time of training and evaluation, "eval": {N: {"accuracy", "eval_loss"}}}.
  """
  t0 = time.perf_counter()
  model = lm_lib.TransformerLM(config, rngs=nnx.Rngs(seed))
  warmup = int(warmup_fraction * steps)
  tx = training.make_optimizer(learning_rate, warmup_steps=warmup,
                               total_steps=max(steps, warmup + 1), weight_decay=weight_decay)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  task = dict(seq_len=seq_len, vocab_size=config.vocab_size, placement=placement,
              power_a=power_a)
  train_rng = np.random.default_rng([seed, 0])
  losses = []
  for _ in range(steps):
    batch = mixed_batch(train_rng, batch_size, train_pairs, **task)
    losses.append(_train_step(model, optimizer, batch["inputs"], batch["targets"],
                              batch["mask"]))
  losses = [float(x) for x in jax.device_get(losses)]
  results = {}
  for n in eval_pairs:
    eval_rng = np.random.default_rng([seed, 1, n])
    total_loss = total_acc = 0.0
    done = 0
    while done < eval_examples:
      b = min(batch_size, eval_examples - done)
      batch = mqar_batch(eval_rng, b, num_pairs=n, **task)
      loss, acc = jax.device_get(_eval_step(model, batch["inputs"], batch["targets"],
                                            batch["mask"]))
      total_loss += float(loss) * b
      total_acc += float(acc) * b
      done += b
    results[n] = {"accuracy": total_acc / done, "eval_loss": total_loss / done}
  tail = losses[-max(1, steps // 10):] if losses else [float("nan")]
  return {"train_loss": float(np.mean(tail)), "seconds": time.perf_counter() - t0,
          "eval": results}


# -------------------------------------------------------------------- outputs


def _mean_table(rows):
  """{(label, N): (mean acc, min, max, count)} over seeds."""
  groups: dict[tuple[str, int], list[float]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["num_pairs"]), []).append(r["accuracy"])
  return {k: (float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v))
          for k, v in groups.items()}


def markdown_table(rows, settings) -> str:
  pairs = sorted({r["num_pairs"] for r in rows})
  models = list(dict.fromkeys(r["model"] for r in rows))
  state = {r["model"]: r["state_size"] for r in rows}
  means = _mean_table(rows)
  lines = [f"MQAR accuracy on queried values (held-out, mean over {settings['seeds']} "
           f"seed(s)); T={settings['seq_len']}, V={settings['vocab_size']}, "
           f"{settings['steps']} steps x batch {settings['batch_size']} "
           f"(trained on {'a mix of all N' if settings['train_on'] == 'mix' else 'each N'}), "
           f"E={settings['embed_dim']}, {settings['num_layers']} layers, "
           f"{settings['placement']} placement.", "",
           "| model | state (floats) | " + " | ".join(f"N={n}" for n in pairs) + " |",
           "|---|---:|" + "---:|" * len(pairs)]
  for m in models:
    cells = []
    for n in pairs:
      if (m, n) not in means:
        cells.append("")
        continue
      mean, lo, hi, c = means[(m, n)]
      cells.append(f"{mean:.3f}" + (f" [{lo:.2f}-{hi:.2f}]" if c > 1 else ""))
    lines.append(f"| {m} | {state[m]} | " + " | ".join(cells) + " |")
  lines.append("| chance (1/N) | | " + " | ".join(f"{1 / n:.3f}" for n in pairs) + " |")
  return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  means = _mean_table(rows)
  pairs = sorted({r["num_pairs"] for r in rows})
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.4), width_ratios=(1.25, 1))
  for m in models:
    ns = [n for n in pairs if (m, n) in means]
    ax1.plot(ns, [means[(m, n)][0] for n in ns], marker="o", label=m)
  ax1.plot(pairs, [1 / n for n in pairs], "k:", label="chance 1/N")
  ax1.set_xscale("log", base=2)
  ax1.set_xticks(pairs, [str(n) for n in pairs])
  ax1.set_xlabel("key-value pairs N")
  ax1.set_ylabel("accuracy")
  ax1.set_ylim(-0.02, 1.02)
  ax1.set_title("MQAR accuracy vs N")
  ax1.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fams = [f for f in ("linear", "window") if any(r["family"] == f for r in rows)]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for fam, style in zip(fams, ("-", "--")):
    for i, n in enumerate(pairs):
      pts = sorted({(r["state_size"], r["model"]) for r in rows
                    if r["family"] == fam and r["num_pairs"] == n})
      if pts:
        ax2.plot([s for s, _ in pts], [means[(m, n)][0] for _, m in pts], style, marker="o",
                 color=colors[i % len(colors)], label=f"{fam} N={n}")
  ax2.set_xscale("log", base=2)
  ax2.set_xlabel("state size (floats, all layers)")
  ax2.set_ylabel("accuracy")
  ax2.set_ylim(-0.02, 1.02)
  ax2.set_title("accuracy vs state size (linear: solid, window: dashed)")
  if fams:
    ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_outputs(rows, settings, out_dir) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"settings": settings, "rows": rows}, f, indent=1)
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  table = markdown_table(rows, settings)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table)
  plot(rows, os.path.join(out_dir, "plot.png"))
  print(table)


# ----------------------------------------------------------------------- main


def _int_list(flag) -> list[int]:
  try:
    values = [int(x) for x in flag.value]
  except ValueError:
    raise app.UsageError(f"--{flag.name}={','.join(flag.value)}: expected integers") from None
  if any(v < 1 for v in values):
    raise app.UsageError(f"--{flag.name}={','.join(flag.value)}: expected integers >= 1")
  return values


def _check_flags() -> None:
  bad = [k for k in _KINDS.value if k not in KINDS]
  if bad or not _KINDS.value:
    raise app.UsageError(f"--kinds: unknown kind(s) {bad}; expected a non-empty subset of "
                         f"{','.join(KINDS)}")
  if _MLP.value is not None and _MLP.value < 1:
    raise app.UsageError(f"--mlp_dim={_MLP.value}: expected an integer >= 1")
  for flag in (_SEQ_LEN, _STEPS, _BATCH, _EVAL, _EMBED, _HEADS, _LAYERS, _SEEDS,
               _BASED_HEAD_DIM):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name}={flag.value}: expected an integer >= 1")
  if _BASED_WINDOW.value < 0:
    raise app.UsageError(f"--based_window={_BASED_WINDOW.value}: expected an integer >= 0")
  if not _LR.value > 0 or not math.isfinite(_LR.value):
    raise app.UsageError(f"--learning_rate={_LR.value}: expected a finite number > 0")
  if _EMBED.value % _HEADS.value:
    raise app.UsageError(f"--embed_dim={_EMBED.value} must be a multiple of "
                         f"--num_heads={_HEADS.value}")
  for n in _NUM_PAIRS.value:
    try:
      check_task(_SEQ_LEN.value, n, _VOCAB.value)
    except ValueError as e:
      raise app.UsageError(f"--num_pairs={n}: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_flags()
  kinds = list(dict.fromkeys(_KINDS.value))
  pairs = sorted(set(_NUM_PAIRS.value))
  seq_len = _SEQ_LEN.value
  try:
    models = variants(
        kinds, seq_len=seq_len, vocab_size=_VOCAB.value, embed_dim=_EMBED.value,
        num_heads=_HEADS.value, num_layers=_LAYERS.value, mlp_dim=_MLP.value,
        feature_map=_FEATURE_MAP.value,
        linear_head_dims=_int_list(_LINEAR_DIMS), linear_output_norm=_LINEAR_NORM.value,
        windows=_int_list(_WINDOWS), based_window=_BASED_WINDOW.value,
        based_head_dim=_BASED_HEAD_DIM.value, sigmoid_bias=_SIGMOID_BIAS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  settings = {name: flags.FLAGS[name].value for name in (
      "kinds", "num_pairs", "seq_len", "vocab_size", "placement", "power_a", "steps",
      "train_on", "batch_size", "eval_examples", "embed_dim", "num_heads", "mlp_dim", "num_layers", "learning_rate",
      "weight_decay", "warmup_fraction", "seeds", "feature_map", "linear_head_dims",
      "linear_output_norm", "windows", "based_window", "based_head_dim", "sigmoid_bias")}
  settings["backend"] = jax.default_backend()
  rows = []
  t0 = time.perf_counter()
  runs = [pairs] if _TRAIN_ON.value == "mix" else [[n] for n in pairs]
  total, done = len(models) * len(runs) * _SEEDS.value, 0
  for variant in models:
    size = state_size(variant.config, seq_len)
    for train_pairs in runs:
      for seed in range(_SEEDS.value):
        result = train_and_eval(
            variant.config, train_pairs=train_pairs, eval_pairs=train_pairs,
            seq_len=seq_len, steps=_STEPS.value, batch_size=_BATCH.value,
            eval_examples=_EVAL.value, learning_rate=_LR.value, seed=seed,
            weight_decay=_WD.value, warmup_fraction=_WARMUP.value,
            placement=_PLACEMENT.value, power_a=_POWER_A.value)
        done += 1
        accs = []
        for n, ev in result["eval"].items():
          rows.append({"model": variant.label, "family": variant.family,
                       "param": variant.param, "num_pairs": n, "seed": seed,
                       "state_size": size, "trained_on": "+".join(map(str, train_pairs)),
                       "accuracy": ev["accuracy"], "eval_loss": ev["eval_loss"],
                       "train_loss": result["train_loss"], "seconds": result["seconds"]})
          accs.append(f"N={n}: {ev['accuracy']:.3f}")
        print(f"[{done}/{total}] {variant.label} (state {size}) seed={seed} trained on "
              f"N={'+'.join(map(str, train_pairs))}: {', '.join(accs)}; "
              f"train_loss={result['train_loss']:.3f} ({result['seconds']:.1f}s)", flush=True)
  settings["total_seconds"] = time.perf_counter() - t0
  write_outputs(rows, settings, _OUT.value)
  print(f"total {settings['total_seconds']:.0f}s; wrote {_OUT.value}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
