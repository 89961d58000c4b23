"""README.md's Python code blocks run as written, as scripts, against a real server.

Each ```python block is saved to a file and run with the test interpreter; ``WSFAN_URL``
points it at a fresh server on a free port (the snippets default to ``make serve``'s URL).
A block that hangs (e.g. a publisher waiting for its own message) fails on the timeout.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.servers import ROOT, ServerProcess

BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks() -> None:
    assert BLOCKS, "README.md has no ```python block (the parametrized test below would pass vacuously)"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs_against_a_real_server(code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    with ServerProcess("--rate-limit", "0") as server:
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env={**server.env, "WSFAN_URL": server.url},
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
