"""experiments/train.py and generate.py, run as scripts with tiny flags; and
the --layers pattern parser (in process)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from attnlib.nn import AttentionConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
from configs import lm as lm_config  # pylint: disable=wrong-import-position

# Tiny runs; the runs of one worker share a persistent XLA compilation cache, so
# a run with the same shapes and --steps as an earlier one skips compilation.
TINY = ["--batch_size=2", "--seq_len=32", "--embed_dim=32", "--num_layers=2",
        "--max_bytes=200000", "--checkpoint_every=3", "--eval_batches=2",
        "--log_every=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

  def run_(script, *flags, ok=True):
    cmd = [sys.executable, str(ROOT / "experiments" / script), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                            check=False)
    if ok:
      assert result.returncode == 0, result.stderr[-3000:]
    return result

  return run_


# One test (not several sharing a fixture), so that pytest-xdist runs it once.
def test_train_resume_and_generate(run, tmp_path):
  workdir = tmp_path / "run"
  # 1. Train 6 steps: checkpoints, config, logged losses, eval, samples.
  first = run("train.py", f"--workdir={workdir}", "--steps=6", "--sample_tokens=8", *TINY)
  ckpts = workdir / lm_config.CHECKPOINT_DIR
  assert (ckpts / "3").is_dir() and (ckpts / "6").is_dir()
  saved = json.loads((workdir / lm_config.CONFIG_FILE).read_text())
  assert saved["model"]["embed_dim"] == 32
  assert [(layer["kind"], layer["decay"]) for layer in saved["model"]["layers"]] == [
      ("linear", "gate"), ("sliding_window", None)]
  assert saved["train"]["steps"] == 6
  for n in range(1, 7):  # absl logs on stderr: every step's loss
    assert re.search(rf"step {n}/6 loss \d+\.\d+", first.stderr), first.stderr[-2000:]
  assert "step 6/6 eval_loss" in first.stderr
  m = re.search(r"eval loss (\d+\.\d+) nats/byte = (\d+\.\d+) bits/byte", first.stdout)
  assert m, first.stdout
  assert float(m.group(2)) == pytest.approx(float(m.group(1)) / math.log(2), abs=2e-3)
  assert first.stdout.count("--- sample") == 2
  assert "\ndef " in first.stdout  # the default prompt starts each sample

  # 2. Run again to 9 steps: resumes from step 6.
  second = run("train.py", f"--workdir={workdir}", "--steps=9", "--sample_tokens=0", *TINY)
  assert "resumed from the checkpoint at step 6" in second.stderr, second.stderr[-2000:]
  assert "step 7/9 loss" in second.stderr and "step 9/9 loss" in second.stderr
  assert not re.search(r"step [1-6]/9 loss", second.stderr)
  assert (ckpts / "9").is_dir() and "after 9 steps" in second.stdout
  assert "--- sample" not in second.stdout

  # 3. Generate from the latest checkpoint.
  gen = run("generate.py", f"--workdir={workdir}", "--prompt=import os",
            "--max_new_tokens=12", "--seed=1")
  assert "restored the model of step 9" in gen.stderr
  assert "prompt: 9 bytes, generated: 12 bytes" in gen.stderr
  out = gen.stdout.removesuffix("\n")
  assert out.startswith("import os")
  # 12 bytes decode to at most 12 characters (invalid UTF-8: one U+FFFD each).
  assert 1 <= len(out) - len("import os") <= 12

  # 4. Other model flags on this workdir: refused, nothing overwritten.
  bad = run("train.py", f"--workdir={workdir}", "--steps=12", *TINY, "--embed_dim=64",
            ok=False)
  assert bad.returncode != 0
  assert "holds a model with another config (differs in embed_dim" in bad.stderr
  assert json.loads((workdir / lm_config.CONFIG_FILE).read_text()) == dict(
      saved, train=dict(saved["train"], steps=9))


def test_train_on_a_text_file(run, tmp_path):
  data = tmp_path / "corpus.txt"
  data.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
  result = run("train.py", f"--workdir={tmp_path / 'run'}", f"--data={data}", "--steps=6",
               "--sample_tokens=8", "--sample_prompt=the ", *TINY)
  assert f"data: {data}, 1800 bytes" in result.stderr
  assert "eval loss" in result.stdout and "\nthe " in result.stdout


@pytest.mark.parametrize("flag,message", [
    ("--layers=gate,bogus", "unknown token 'bogus'"),
    ("--batch_size=0", "--batch_size=0 must be >= 1"),
])
def test_bad_flags_exit_with_a_message(run, tmp_path, flag, message):
  result = run("train.py", f"--workdir={tmp_path}", flag, ok=False)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / lm_config.CONFIG_FILE).exists()


def test_layer_tokens_map_to_their_configs():
  parse = lambda spec, n=1: lm_config.parse_layers(spec, n, window=16, seq_len=128)  # noqa: E731
  want = {
      "softmax": AttentionConfig(kind="softmax", rope=True),
      "linear": AttentionConfig(kind="linear", output_norm=True),
      "taylor": AttentionConfig(kind="linear", feature_map="taylor", output_norm=True),
      "rate": AttentionConfig(kind="linear", decay="rate", output_norm=True),
      "gate": AttentionConfig(kind="linear", decay="gate", output_norm=True),
      "window": AttentionConfig(kind="sliding_window", window=16, rope=True),
      "sigmoid": AttentionConfig(kind="sigmoid", bias=-math.log(128), rope=True),
      "aaren": AttentionConfig(kind="aaren"),
  }
  assert set(want) | {"based"} == set(lm_config.LAYER_TOKENS)
  for token, cfg in want.items():
    assert parse(token) == (cfg,)
    assert parse(f" {token.upper()} ") == (cfg,)  # case and spaces do not matter
  # Patterns cycle over the layers; "based" is taylor, window.
  assert parse("gate,window", 5) == (want["gate"], want["window"]) * 2 + (want["gate"],)
  assert parse("based", 4) == (want["taylor"], want["window"]) * 2
  assert parse("softmax,based", 3) == (want["softmax"], want["taylor"], want["window"])
  for bad in ("", "gate,,window", "bogus", "gate,soft"):
    with pytest.raises(ValueError, match="--layers"):
      parse(bad)


def test_config_json_round_trip():
  from attnlib.models import LMConfig  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  layers = lm_config.parse_layers("softmax,linear,taylor,rate,gate,window,sigmoid,aaren",
                                  8, window=7, seq_len=64)
  cfg = LMConfig(embed_dim=32, num_heads=4, num_kv_heads=2, layers=layers,
                 dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  d = json.loads(json.dumps(lm_config.config_to_dict(cfg)))
  back = lm_config.config_from_dict(d)
  assert back.layers == cfg.layers
  assert lm_config.config_to_dict(back) == lm_config.config_to_dict(cfg)
  assert back.param_dtype == jnp.bfloat16
