"""``python -m wsfan.bench report DIR``: rebuild DIR/report.md and its plots from the JSON files there (runs nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsfan.bench import report  # the module, not its names: report.py imports the scenarios' sections
from wsfan.bench.suite import copy_latest

NAME = "report"
HELP = "rebuild a run folder's report.md and plots from its JSON files"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a run folder, e.g. results/20261126-1200-vm")
    p.add_argument("--latest", action="store_true", help="also copy the report to results/latest.md")


def run(args: argparse.Namespace) -> int:
    md = report.render_folder(args.folder.resolve())
    print(f"wrote {md}")
    if args.latest:
        print(f"wrote {copy_latest(args.folder.resolve(), md)}")
    return 0
