"""Byte-level text data: tokenizer, corpora, split and a stateless batch sampler.

Tokens are the bytes of the text (vocabulary of 256, ``VOCAB_SIZE``), so any
file is a corpus and nothing has to be trained or downloaded:

* ``encode(text)`` / ``decode(tokens)``: str or bytes -> int32 tokens in
  [0, 255] and back (invalid UTF-8 decodes to U+FFFD, ``errors="replace"``).
* ``stdlib_corpus(max_bytes)``: the default corpus, the ``.py`` files of the
  running Python's standard library, read at run time.
* ``load_text(path)``: the bytes of any file; ``load_corpus(path)``: either one,
  as tokens.
* ``train_val_split(tokens, val_fraction)``: the last fraction is held out.
* ``batch_at(tokens, step, batch_size, seq_len, seed)``: the batch of a training
  step as a pure function of ``(seed, step)``. A resumed run therefore sees
  exactly the batches an uninterrupted one would, and there is no iterator
  state to checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig

import numpy as np

VOCAB_SIZE = 256

# Directory names skipped (anywhere below the stdlib root) by stdlib_corpus:
# third-party packages and the standard library's own test suites.
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def _check_int(name: str, value, *, minimum: int, fn: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{fn}: {name}={value!r} must be an int >= {minimum}")
  if value < minimum:
    raise ValueError(f"{fn}: {name}={value!r} must be an int >= {minimum}")
  return int(value)


def encode(text: str | bytes) -> np.ndarray:
  """UTF-8 bytes of ``text`` (str, or bytes taken as they are) as int32 [N]."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  elif isinstance(text, (bytearray, memoryview)):
    text = bytes(text)
  elif not isinstance(text, bytes):
    raise ValueError(f"encode: text must be str or bytes, got {type(text).__name__}")
  return np.frombuffer(text, dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """int tokens in [0, 255] (any shape, flattened) -> str; bytes that are not
  valid UTF-8 become U+FFFD."""
  arr = np.asarray(tokens)
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"decode: tokens must be integers, got dtype {arr.dtype}")
  arr = arr.reshape(-1)
  if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
    raise ValueError(f"decode: tokens must lie in [0, {VOCAB_SIZE - 1}], got range "
                     f"[{arr.min()}, {arr.max()}]")
  return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def stdlib_files(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The ``.py`` files below ``root`` (default: this interpreter's stdlib,
  ``sysconfig.get_paths()["stdlib"]``), skipping any directory named in
  ``STDLIB_SKIP_DIRS``, sorted by their path relative to ``root`` (so the order
  does not depend on the file system)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"] if root is None else root)
  if not root.is_dir():
    raise ValueError(f"stdlib_files: root={str(root)!r} is not a directory")
  files = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
      continue
    files.append(rel)
  return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def stdlib_corpus(max_bytes: int | None = None, *,
                  root: str | os.PathLike | None = None) -> bytes:
  """The default corpus: the ``stdlib_files()`` concatenated in order, each
  followed by a newline, cut at ``max_bytes`` (None: all of them, about 12 MB
  for CPython 3.12). Deterministic for a given Python installation."""
  if max_bytes is not None:
    max_bytes = _check_int("max_bytes", max_bytes, minimum=1, fn="stdlib_corpus")
  parts, size = [], 0
  for path in stdlib_files(root):
    data = path.read_bytes() + b"\n"
    if max_bytes is not None and size + len(data) >= max_bytes:
      parts.append(data[:max_bytes - size])
      size = max_bytes
      break
    parts.append(data)
    size += len(data)
  if not size:
    raise ValueError(f"stdlib_corpus: no .py files found below root={root!r}")
  return b"".join(parts)


def load_text(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
  """The bytes of the file at ``path`` (any encoding; tokens are bytes), the
  first ``max_bytes`` of them if given."""
  if max_bytes is not None:
    max_bytes = _check_int("max_bytes", max_bytes, minimum=1, fn="load_text")
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"load_text: path={str(path)!r} is not a file")
  with open(path, "rb") as f:
    data = f.read() if max_bytes is None else f.read(max_bytes)
  if not data:
    raise ValueError(f"load_text: path={str(path)!r} is empty")
  return data


def load_corpus(path: str | os.PathLike | None = None, *,
                max_bytes: int | None = None) -> np.ndarray:
  """Tokens of the file at ``path``, or of ``stdlib_corpus`` when ``path`` is
  None or empty (the ``--data`` flag's default)."""
  if path is None or str(path) == "":
    return encode(stdlib_corpus(max_bytes))
  return encode(load_text(path, max_bytes))


def train_val_split(tokens, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation): the first ``1 - val_fraction`` of the 1-D token array
  and the rest (a contiguous tail, so no window straddles both). Both parts
  are non-empty; ``val_fraction`` lies in (0, 1)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"train_val_split: tokens must be 1-D, got shape {tokens.shape}")
  if isinstance(val_fraction, bool) or not 0.0 < float(val_fraction) < 1.0:
    raise ValueError(f"train_val_split: val_fraction={val_fraction!r} must lie in (0, 1)")
  n_val = int(round(tokens.shape[0] * float(val_fraction)))
  if n_val < 1 or n_val >= tokens.shape[0]:
    raise ValueError(f"train_val_split: val_fraction={val_fraction!r} of {tokens.shape[0]} "
                     f"tokens leaves an empty part ({n_val} validation tokens)")
  return tokens[:-n_val], tokens[-n_val:]


def batch_at(tokens, step: int, batch_size: int, seq_len: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The batch of training step ``step``: ``batch_size`` windows of
  ``seq_len + 1`` consecutive tokens at offsets drawn uniformly by a NumPy
  generator seeded with ``(seed, step)``; returns ``(inputs, targets)``, both
  int32 [batch_size, seq_len], with ``targets[:, t] == inputs[:, t + 1]``
  inside a window (targets are the inputs shifted by one token)."""
  fn = "batch_at"
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{fn}: tokens must be a 1-D integer array, got shape {tokens.shape} "
                     f"dtype {tokens.dtype}")
  step = _check_int("step", step, minimum=0, fn=fn)
  batch_size = _check_int("batch_size", batch_size, minimum=1, fn=fn)
  seq_len = _check_int("seq_len", seq_len, minimum=1, fn=fn)
  seed = _check_int("seed", seed, minimum=0, fn=fn)
  n = tokens.shape[0]
  if n < seq_len + 1:
    raise ValueError(f"{fn}: seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} "
                     f"tokens, got {n}")
  rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
  starts = rng.integers(0, n - seq_len, size=batch_size)
  window = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return window[:, :-1], window[:, 1:]
