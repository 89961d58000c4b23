"""The Makefile as a new user meets it: ``make help`` lists every target, a stale .venv is named."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.servers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def phony_targets() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return [t for line in re.findall(r"^\.PHONY:(.*)$", text, flags=re.M) for t in line.split()]


def test_make_help_lists_every_phony_target() -> None:
    targets = phony_targets()
    assert len(targets) > 10, targets
    r = make("help")
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"^make ([\w-]+)", r.stdout, flags=re.M))
    assert set(targets) - listed == set(), r.stdout
    assert listed - set(targets) == set(), "help lists a target that is not .PHONY"


def _fake_python(path: Path, version: str) -> Path:
    """A ``python`` that reports ``version`` and answers the version check like that interpreter would."""
    major, minor = (int(x) for x in version.split(".")[:2])
    old = (major, minor) < (3, 11)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\ncase "$2" in *python_version*) echo {version}; exit 0;; esac\nexit {1 if old else 0}\n'
    )
    path.chmod(0o755)
    return path


def test_a_venv_made_by_python_older_than_3_11_is_named_with_make_clean(tmp_path: Path) -> None:
    _fake_python(tmp_path / "oldvenv" / "bin" / "python", "3.9.18")
    r = make("venv-check", f"VENV={tmp_path / 'oldvenv'}")
    assert r.returncode != 0
    assert "Python 3.9.18" in r.stderr and "make clean" in r.stderr, r.stderr


def test_a_too_old_python_is_refused_before_it_makes_a_venv(tmp_path: Path) -> None:
    old = _fake_python(tmp_path / "bin" / "python3.9", "3.9.18")
    venv = tmp_path / "never"
    r = make("install", f"VENV={venv}", f"PYTHON={old}")
    assert r.returncode != 0
    assert "3.9.18" in r.stderr and "3.11" in r.stderr, r.stderr
    assert not venv.exists(), "a venv was made by a Python that cannot run wsfan"


def test_the_current_venv_passes_the_check() -> None:
    r = make("venv-check")
    assert r.returncode == 0, r.stderr


def test_make_token_does_not_print_the_secret() -> None:
    """make echoed '.venv/bin/python -m wsfan token --sub alice --secret <the secret>' before the token."""
    secret = "makefile-test-secret-of-32-bytes-or-more"
    r = make("token", f"ARGS=--sub alice --secret {secret}")
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    assert re.fullmatch(r"eyJ[\w-]+\.[\w-]+\.[\w-]+\n", r.stdout), r.stdout
    import jwt

    assert jwt.decode(r.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "alice"
