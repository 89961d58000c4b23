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


def test_every_close_code_of_ours_is_in_the_readme_and_protocol() -> None:
    """The server's own close codes (4000-4999, wire.CloseCode) are all in README's "Close codes"
    sentence, and every code it sends on a WebSocket is in PROTOCOL.md's table (before: the
    README lacked 4003, the server API's disconnect)."""
    from wsfan.server.wire import CloseCode

    readme = (ROOT / "README.md").read_text()
    sentence = re.search(r"^Close codes: (.*?)\.$", readme, flags=re.S | re.M)
    assert sentence is not None, "README.md has no 'Close codes: ...' sentence"
    listed = {int(c) for c in re.findall(r"\b(\d{4})\b", sentence.group(1))}
    ours = {int(c) for c in CloseCode if 4000 <= c < 5000}
    assert ours <= listed, f"README lacks {sorted(ours - listed)}"
    table = {
        int(c) for c in re.findall(r"^\| (\d{4}) \|", (ROOT / "docs/PROTOCOL.md").read_text(), flags=re.M)
    }
    on_websocket = {int(c) for c in CloseCode if c is not CloseCode.TRY_AGAIN_LATER}  # 1013: SSE's event only
    assert on_websocket <= table, f"PROTOCOL.md lacks {sorted(on_websocket - table)}"


def _readme_flag_table() -> set[str]:
    """The flags named in the first column of README's flag table (``| flag | default | meaning |``)."""
    text = (ROOT / "README.md").read_text()
    table = re.search(r"^\| flag \| default \| meaning \|\n(.*?)\n\n", text, flags=re.S | re.M)
    assert table, "README.md has no '| flag | default | meaning |' table"
    first = [row.split("|")[1] for row in table.group(1).splitlines() if row.startswith("| `")]
    return {flag for cell in first for flag in re.findall(r"--[a-z][a-z0-9-]*", cell)}


def test_the_readme_flag_table_lists_every_flag_of_wsfan_help() -> None:
    """Every option of ``wsfan --help`` (--config, --tls-cert and --tls-key were missing) is in the
    table, and nothing else is; an on/off flag that is on by default shows its --no- form, the way
    to turn it off (--no-allow-publish was nowhere)."""
    from wsfan.server import config

    helped = subprocess.run(
        [sys.executable, "-m", "wsfan", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helped)) - {"--help"}
    parser_flags = {s for a in config.build_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert flags >= parser_flags - {"--help"}, parser_flags - flags
    table = _readme_flag_table()
    defaults = config.Settings()
    wanted = {f for f in parser_flags - {"--help"} if not f.startswith("--no-")}
    wanted |= {
        "--no-" + name.replace("_", "-")
        for name, kind in config.Settings.__annotations__.items()
        if kind == "bool" and getattr(defaults, name) is True
    }
    assert wanted - table == set(), f"README's flag table lacks {sorted(wanted - table)}"
    assert table - parser_flags == set(), (
        f"README's flag table names flags wsfan does not have: {sorted(table - parser_flags)}"
    )
