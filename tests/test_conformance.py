"""RFC 6455 conformance of the /echo endpoint via the Autobahn|Testsuite fuzzingclient.

Why a subprocess: the real work is tests/conformance/run_autobahn.py, the same script that
`make conformance` runs, so pytest, make and CI can never disagree about what "conformant" means.

Why it may skip: wstest needs a Python 2.7 venv that lives outside the repo and is built by
tests/conformance/install_autobahn.sh. A developer who has not built it gets a skip with the
command to run; CI sets WSFAN_REQUIRE_AUTOBAHN=1 so a missing install is a failure, not a
silently green run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tests" / "conformance" / "run_autobahn.py"
sys.path.insert(0, str(SCRIPT.parent))
from run_autobahn import CI_CASES  # noqa: E402

INSTALLER = REPO_ROOT / "tests" / "conformance" / "install_autobahn.sh"


def _autobahn_venv() -> Path:
    """Same default location as install_autobahn.sh (kept in sync by hand; both are tiny)."""
    venv = os.environ.get("WSFAN_AUTOBAHN_VENV")
    if venv:
        return Path(venv)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "wsfan" / "autobahn-venv"


def _wstest_or_skip() -> Path:
    """Return the cached wstest, or skip (fail when WSFAN_REQUIRE_AUTOBAHN=1)."""
    explicit = os.environ.get("WSFAN_WSTEST")
    venv = _autobahn_venv()
    wstest = Path(explicit) if explicit else venv / "bin" / "wstest"
    # The stamp is written last by the installer, so its presence means a complete install.
    installed = os.access(wstest, os.X_OK) and (explicit or (venv / ".wsfan-autobahn-stamp").exists())
    if installed:
        return wstest
    reason = f"Autobahn|Testsuite not installed at {wstest}; run: bash {INSTALLER.relative_to(REPO_ROOT)}"
    if os.environ.get("WSFAN_REQUIRE_AUTOBAHN") == "1":
        pytest.fail(f"WSFAN_REQUIRE_AUTOBAHN=1 but {reason}")
    pytest.skip(reason)


@pytest.mark.timeout(480)
def test_autobahn_fuzzingclient_echo(tmp_path: Path) -> None:
    """Every Autobahn case but 9.* (and, of permessage-deflate's 12.*/13.*, two sizes of each group)
    is OK/NON-STRICT/INFORMATIONAL; SIGTERM exits 0. ``make conformance`` runs all of 12.*/13.*."""
    wstest = _wstest_or_skip()
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--no-install",
        "--wstest",
        str(wstest),
        "--outdir",
        str(tmp_path),
        "--timeout",
        "420",
        "--cases",
        *CI_CASES,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=470
    )
    assert proc.returncode == 0, (
        f"run_autobahn.py exited {proc.returncode} (1 = non-conformant cases, 2 = harness/server broke); "
        f"reports in {tmp_path}\n{proc.stdout}"
    )


def test_installer_without_python_2_7_says_what_to_install(tmp_path: Path) -> None:
    """No pyenv, no python2.7 on PATH, no WSFAN_PYTHON27: one error naming the ways to get a 2.7."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if any(Path(d, "python2.7").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("this machine has a system python2.7 on /usr/bin")
    done = subprocess.run(["bash", str(INSTALLER)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""  # stdout carries only the wstest path, on success
    assert "no Python 2.7 interpreter found" in done.stderr
    assert "pyenv install 2.7.18" in done.stderr and "WSFAN_PYTHON27" in done.stderr
