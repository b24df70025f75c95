"""Every Python block of the README runs, in order, in a fresh folder and a fresh interpreter each.

A block whose first line is a file name comment (``# mymodels.py``) is written as that file for the
blocks after it, as a user would save it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
FILE_BLOCK = re.compile(r"# ([\w/]+\.py)\n")


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


def test_every_python_block_of_the_readme_runs(tmp_path):
    for i, block in enumerate(BLOCKS):
        named = FILE_BLOCK.match(block)
        if named:
            (tmp_path / named.group(1)).write_text(block)
            continue
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(block)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"README Python block {i} failed:\n{block}\n{proc.stderr[-3000:]}"
