"""attnlib.data: byte-level text data for language-model training.

See ``attnlib.data.text``: ``encode``/``decode`` (256 byte tokens), the default
corpus ``stdlib_corpus`` (the Python standard library's ``.py`` files, read at
run time), ``load_text``/``load_corpus`` for any file, ``train_val_split`` and
the stateless sampler ``batch_at(tokens, step, batch_size, seq_len, seed)``.
"""

from attnlib.data.text import VOCAB_SIZE
from attnlib.data.text import batch_at
from attnlib.data.text import decode
from attnlib.data.text import encode
from attnlib.data.text import load_corpus
from attnlib.data.text import load_text
from attnlib.data.text import stdlib_corpus
from attnlib.data.text import stdlib_files
from attnlib.data.text import train_val_split

__all__ = [
    "VOCAB_SIZE",
    "batch_at",
    "decode",
    "encode",
    "load_corpus",
    "load_text",
    "stdlib_corpus",
    "stdlib_files",
    "train_val_split",
]
