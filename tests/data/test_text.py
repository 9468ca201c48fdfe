"""Tests for attnlib.data.text: tokenizer, corpora, split, batch sampler."""

from __future__ import annotations

import sysconfig

import numpy as np
import pytest

from attnlib import data


@pytest.mark.parametrize("text", ["", "hello, world\n",
                                  "héllo wörld ✓ 日本語 🙂 \x00\x7f"])
def test_round_trip(text):
  tokens = data.encode(text)
  assert tokens.dtype == np.int32 and tokens.ndim == 1
  assert tokens.shape[0] == len(text.encode("utf-8"))
  assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < data.VOCAB_SIZE)
  assert data.decode(tokens) == text
  assert data.decode(tokens.tolist()) == text
  np.testing.assert_array_equal(data.encode(text.encode("utf-8")), tokens)


def test_non_ascii_is_multibyte():
  np.testing.assert_array_equal(data.encode("é"), [0xC3, 0xA9])
  np.testing.assert_array_equal(data.encode(b"\xff\x00"), [255, 0])


def test_decode_replaces_invalid_utf8():
  # A truncated 3-byte sequence and a lone continuation byte.
  assert data.decode([104, 0xE2, 0x9C, 105, 0x80]) == "h\ufffdi\ufffd"
  assert data.decode(np.array([[72, 105]])) == "Hi"


@pytest.mark.parametrize("tokens, match", [
    ([0, 256], r"\[0, 255\]"), ([-1], r"\[0, 255\]"), (np.array([1.5]), "integers")])
def test_decode_rejects(tokens, match):
  with pytest.raises(ValueError, match=match):
    data.decode(tokens)


def test_encode_rejects_non_text():
  with pytest.raises(ValueError, match="str or bytes"):
    data.encode(123)


def test_stdlib_files():
  root = sysconfig.get_paths()["stdlib"]
  files = data.stdlib_files()
  assert len(files) > 100
  rel = [f.relative_to(root).as_posix() for f in files]
  assert rel == sorted(rel)
  assert all(r.endswith(".py") for r in rel)
  for r in rel:
    assert not data.text.STDLIB_SKIP_DIRS.intersection(r.split("/")[:-1]), r
  assert "os.py" in rel and "json/decoder.py" in rel


def test_stdlib_corpus_bounded_and_deterministic():
  a = data.stdlib_corpus(max_bytes=200_000)
  assert isinstance(a, bytes) and len(a) == 200_000
  assert a == data.stdlib_corpus(max_bytes=200_000)
  # The corpus is the files in order, each followed by a newline.
  files = data.stdlib_files()
  first = files[0].read_bytes() + b"\n" + files[1].read_bytes() + b"\n"
  assert a.startswith(first[:200_000])
  small = data.stdlib_corpus(max_bytes=10)
  assert small == a[:10]
  tokens = data.load_corpus(None, max_bytes=5000)
  np.testing.assert_array_equal(tokens, data.encode(a[:5000]))
  assert "def " in data.decode(tokens)


def test_stdlib_corpus_whole(tmp_path):
  (tmp_path / "b.py").write_text("bb")
  (tmp_path / "a.py").write_text("a")
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "c.py").write_text("skipped")
  (tmp_path / "notes.txt").write_text("not python")
  assert data.stdlib_corpus(root=tmp_path) == b"a\nbb\n"
  assert data.stdlib_corpus(4, root=tmp_path) == b"a\nbb"


def test_stdlib_corpus_rejects():
  with pytest.raises(ValueError, match="max_bytes=0"):
    data.stdlib_corpus(max_bytes=0)


def test_load_text(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes("naïve\n\xff".encode("utf-8") + b"\xff")
  assert data.load_text(path) == path.read_bytes()
  assert data.load_text(str(path), max_bytes=3) == path.read_bytes()[:3]
  np.testing.assert_array_equal(data.load_corpus(path), data.encode(path.read_bytes()))
  with pytest.raises(ValueError, match="is not a file"):
    data.load_text(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="is empty"):
    data.load_text(tmp_path / "empty.txt")


def test_train_val_split():
  tokens = np.arange(100, dtype=np.int32)
  train, val = data.train_val_split(tokens, 0.1)
  np.testing.assert_array_equal(train, tokens[:90])
  np.testing.assert_array_equal(val, tokens[90:])
  train, val = data.train_val_split(tokens, 0.25)
  assert (len(train), len(val)) == (75, 25)
  for bad in (0.0, 1.0, -0.5, True):
    with pytest.raises(ValueError, match="val_fraction"):
      data.train_val_split(tokens, bad)
  with pytest.raises(ValueError, match="empty part"):
    data.train_val_split(tokens[:3], 0.01)
  with pytest.raises(ValueError, match="1-D"):
    data.train_val_split(tokens.reshape(10, 10))


def test_batch_at_deterministic_and_shifted():
  tokens = np.arange(1000, dtype=np.int32)
  inputs, targets = data.batch_at(tokens, 7, 4, 16, seed=3)
  assert inputs.shape == targets.shape == (4, 16)
  assert inputs.dtype == targets.dtype == np.int32
  again = data.batch_at(tokens, 7, 4, 16, seed=3)
  np.testing.assert_array_equal(again[0], inputs)
  np.testing.assert_array_equal(again[1], targets)
  # Windows of consecutive tokens; targets are the inputs shifted by one.
  np.testing.assert_array_equal(inputs - inputs[:, :1], np.broadcast_to(np.arange(16), (4, 16)))
  np.testing.assert_array_equal(targets, inputs + 1)
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  # Other steps and seeds draw other batches.
  assert not np.array_equal(data.batch_at(tokens, 8, 4, 16, seed=3)[0], inputs)
  assert not np.array_equal(data.batch_at(tokens, 7, 4, 16, seed=4)[0], inputs)


def test_batch_at_covers_all_windows():
  tokens = np.arange(20, dtype=np.int32)
  starts = np.concatenate([data.batch_at(tokens, s, 8, 5)[0][:, 0] for s in range(200)])
  assert set(starts.tolist()) == set(range(20 - 5))  # the last window ends at token 19
  inputs, targets = data.batch_at(tokens, 0, 3, 19)  # the only window
  np.testing.assert_array_equal(inputs, np.broadcast_to(np.arange(19), (3, 19)))
  np.testing.assert_array_equal(targets, inputs + 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=100), r"seq_len=100 needs at least seq_len \+ 1 = 101 tokens, got 50"),
    (dict(step=-1), "step=-1"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(seq_len=0), "seq_len=0"),
    (dict(seed=-2), "seed=-2"),
    (dict(step=1.5), "step=1.5"),
    (dict(tokens=np.zeros((5, 10), np.int32)), "1-D integer array"),
    (dict(tokens=np.zeros(50, np.float32)), "1-D integer array"),
])
def test_batch_at_rejects(kwargs, match):
  args = dict(tokens=np.arange(50), step=0, batch_size=2, seq_len=8, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    data.batch_at(**args)
