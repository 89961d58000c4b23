"""Result files: machine description, timestamped raw JSON, the latest markdown table."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
#: The committed figures live in the checkout's results/; an installed wheel writes under ./results/.
RESULTS = ROOT / "results" if (ROOT / "pyproject.toml").exists() else Path.cwd() / "results"
#: Where runs go unless published: quick runs (CI size) and local full runs, both git-ignored.
QUICK_RESULTS = RESULTS / "tmp"
LOCAL_RESULTS = RESULTS / "local"


def results_dir(quick: bool, publish: bool) -> Path:
    """Where a run writes: ``results/`` only when published (``--publish``), else a git-ignored folder.

    Quick runs never publish (their figures are indicative only): ``ValueError``.
    """
    if publish and quick:
        raise ValueError("--publish needs a full run: quick figures are indicative only")
    if publish:
        return RESULTS
    return QUICK_RESULTS if quick else LOCAL_RESULTS


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files: hardware, kernel, interpreter, library versions."""
    vm = psutil.virtual_memory()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_freq_mhz": getattr(psutil.cpu_freq(), "current", None) if psutil.cpu_freq() else None,
        "memory_total_mb": vm.total // (1024 * 1024),
        "kernel": platform.release(),
        "os": platform.platform(),
        "hypervisor": _hypervisor(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": {
            d: _version(d)
            for d in (
                "wsfan",
                "picows",
                "aiofastnet",
                "uvloop",
                "msgspec",
                "redis",
                "locust",
                "websockets",
                "numpy",
                "psutil",
            )
        },
        "tools": {"redis-server": _tool_version("redis-server"), "node": _tool_version("node")},
        "picows_uses_aiofastnet": _picows_uses_aiofastnet(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "loadavg": os.getloadavg(),
        "taskset": shutil.which("taskset") is not None,
    }


def _tool_version(name: str) -> str | None:
    """``<tool> --version`` (first line), for the programs a run drives besides Python packages."""
    path = shutil.which(name)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else None


def _hypervisor() -> str | None:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "virtual machine" if " hypervisor" in flags else "bare metal"
    return None


def _picows_uses_aiofastnet() -> bool | None:
    """picows switches its transports to aiofastnet when that package is importable (faster, but bigger)."""
    try:
        import picows.api
    except ImportError:
        return None
    return bool(getattr(picows.api, "_HAS_AIOFASTNET", False))


def timestamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path) -> tuple[Path, Path]:
    """``<name>-<timestamp>.json`` (raw, every run) and ``<name>-latest.md`` (the summary table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}-{payload.get('stamp') or timestamp()}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path = out_dir / f"{name}-latest.md"
    md_path.write_text(markdown)
    return json_path, md_path


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines
