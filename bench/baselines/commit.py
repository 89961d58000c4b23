"""wsfan as it was at an earlier commit, runnable next to today's: the ``--baseline REF`` server.

``tree(ref)`` exports the commit with ``git archive`` (no worktree, nothing in the
repository changes) into ``~/.cache/wsfan/baseline/<sha>/`` and lays it out as the
installed package is laid out (pyproject.toml's ``package-dir``: ``wsfan`` is ``wsfan/``,
``wsfan.server`` is ``server/``, ...): ``pkg/wsfan/`` holds the top package's files and a
symlink per sub-package. Started with ``pkg/`` as its working directory (``python -m``
puts the working directory first on ``sys.path``), the server imports the old code, not
the editable install of this checkout. Third-party libraries are this venv's.

Errors: ``BaselineError`` when git is missing, the ref names no commit, or the export fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("WSFAN_BASELINE_HOME", Path.home() / ".cache" / "wsfan" / "baseline"))
ROOT = Path(__file__).resolve().parents[2]
#: pyproject.toml's [tool.setuptools.package-dir]: sub-package -> folder of the repository.
SUBPACKAGES = {"server": "server", "client": "client", "loadtest": "loadtest", "bench": "bench"}


class BaselineError(RuntimeError):
    """The baseline commit could not be resolved or exported."""


def resolve(ref: str) -> str:
    """The full commit hash ``ref`` names in this repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BaselineError(f"cannot run git to resolve {ref!r}: {exc}") from exc
    if out.returncode != 0 or not out.stdout.strip():
        raise BaselineError(f"{ref!r} names no commit of {ROOT}")
    return out.stdout.strip()


def tree(ref: str) -> tuple[Path, str]:
    """(folder to start ``python -m wsfan`` in, full commit hash); exported once per commit, then reused."""
    sha = resolve(ref)
    home = CACHE / sha
    pkg = home / "pkg"
    if (home / "complete").exists():
        return pkg, sha
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=CACHE))
    try:
        archive = work / "src.tar"
        with open(archive, "wb") as f:
            done = subprocess.run(
                ["git", "archive", sha], cwd=ROOT, stdout=f, stderr=subprocess.PIPE, timeout=120
            )
        if done.returncode != 0:
            raise BaselineError(
                f"git archive {sha[:12]} failed: {done.stderr.decode(errors='replace')[-500:]}"
            )
        src = work / "src"
        with tarfile.open(archive) as t:
            t.extractall(src, filter="data")
        archive.unlink()
        top = work / "pkg" / "wsfan"
        shutil.copytree(src / "wsfan", top)
        for name, folder in SUBPACKAGES.items():
            if (src / folder).is_dir():
                (top / name).symlink_to(Path("..") / ".." / "src" / folder, target_is_directory=True)
        (work / "complete").write_text(sha + "\n")
        shutil.rmtree(home, ignore_errors=True)
        work.rename(home)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return pkg, sha
