"""Find or install Bun for the Bun baseline, in a folder the benchmark manages (never system-wide).

The ``bun`` npm package ships the real binary in an optional, per-platform
dependency (``@oven/bun-linux-x64``, ``-baseline`` for CPUs without AVX2,
``-musl``...), so ``npm install bun`` into ``~/.cache/wsfan/bun`` is enough: no
install script, no download from outside the npm registry. The version is
pinned so that results from different days compare like with like; set
``WSFAN_BUN_VERSION`` to try another. ``WSFAN_BUN_HOME`` moves the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BUN_VERSION = os.environ.get("WSFAN_BUN_VERSION", "1.4.5")
BUN_HOME = Path(os.environ.get("WSFAN_BUN_HOME", Path.home() / ".cache" / "wsfan" / "bun"))
SERVER_JS = Path(__file__).resolve().parent / "bun_server.js"


def find_bun() -> Path | None:
    """The managed binary if installed (the platform package's, not the npm shim), else None."""
    for candidate in sorted(BUN_HOME.glob("node_modules/@oven/bun-*/bin/bun")):
        if os.access(candidate, os.X_OK) and _works(candidate):
            return candidate
    shim = BUN_HOME / "node_modules" / ".bin" / "bun"
    if shim.exists() and _works(shim):
        return shim
    return None


def _works(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def version(path: Path) -> str | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ensure_bun(install: bool) -> tuple[Path | None, str]:
    """(binary, note). Installs with npm when ``install`` and npm exists; the note says why Bun is missing."""
    found = find_bun()
    if found is not None:
        return found, f"Bun {version(found)} from {BUN_HOME}"
    if not install:
        return None, f"Bun not installed in {BUN_HOME} (a full run installs it with npm)"
    npm = shutil.which("npm")
    if npm is None:
        return None, "Bun skipped: npm is not available on this machine"
    BUN_HOME.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(BUN_HOME), f"bun@{BUN_VERSION}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"Bun skipped: npm install failed ({exc})"
    found = find_bun()
    if found is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return None, f"Bun skipped: npm install bun@{BUN_VERSION} gave no working binary ({' / '.join(tail)})"
    return found, f"Bun {version(found)} installed with npm into {BUN_HOME}"
