"""The README's example runs as written."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(capsys):
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert "(2, 100, 4, 32)" in capsys.readouterr().out
