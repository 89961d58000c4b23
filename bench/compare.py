"""``python -m wsfan.bench compare RUN_A RUN_B``: every figure of two run folders side by side, with B ÷ A.

Rows are matched by scenario and by what names them (variant, room size, phase, ...).
A change is flagged when B ÷ A moves further from 1 than the run-to-run noise either
run measured for that figure (``(max - min) / median`` over its repetitions, see
bench/repeats.py), or than ``--min-change`` (default 5 %) when that is larger. A run
without repetitions has no measured noise: ``--assumed-noise`` (default 10 %) stands in,
and the table says so.

Exit status: 0 when nothing changed beyond the noise, 1 when something did (so a CI job
can compare a branch with its base), 2 when a folder holds no results.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsfan.bench.repeats import IDENTITY, noise
from wsfan.bench.results import markdown_table

NAME = "compare"
HELP = "two run folders side by side: every figure, B ÷ A, and the changes beyond the measured noise"

#: Leaf names that are figures worth comparing (everything else is bookkeeping: seqs, counts, flags).
FIGURE_SUFFIXES = (
    "_us",
    "_ms",
    "_s",
    "_per_s",
    "per_delivery",
    "per_connection",
    "per_connect",
    "per_join",
    "_kb",
    "_mb",
    "p50",
    "p90",
    "p99",
    "p999",
    "max",
    "mean",
)
SKIP_PREFIXES = ("seq", "first_", "last_", "interval.", "spread")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", type=Path, help="baseline run folder (results/<stamp>-<host>/)")
    p.add_argument("run_b", type=Path, help="run folder to compare with it")
    p.add_argument("--min-change", type=float, default=0.05, help="smallest relative change flagged (0.05)")
    p.add_argument(
        "--assumed-noise",
        type=float,
        default=0.10,
        help="noise assumed for a figure when neither run repeated it (0.10)",
    )
    p.add_argument(
        "--all", action="store_true", help="print unchanged figures too (default: only the flagged)"
    )


def load(folder: Path) -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(folder.glob("*.json")):
        if path.name == "machine.json":
            continue
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "data" in doc and "scenario" in doc:
            docs[doc["scenario"]] = doc
    return docs


def figures(row: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted path, value) of every numeric leaf of a row that is a figure (see FIGURE_SUFFIXES)."""
    for k, v in row.items():
        path = f"{prefix}{k}"
        if path.startswith(SKIP_PREFIXES) or k in IDENTITY or k == "histogram":
            continue
        if isinstance(v, dict):
            yield from figures(v, path + ".")
        elif isinstance(v, int | float) and not isinstance(v, bool) and path.endswith(FIGURE_SUFFIXES):
            yield path, float(v)


def row_name(row: dict[str, Any]) -> str:
    return " ".join(str(row[k]) for k in IDENTITY if row.get(k) is not None) or "-"


def compare(
    a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], min_change: float, assumed: float
) -> list[dict[str, Any]]:
    """One entry per figure present in both runs, with ratio, noise and whether it changed."""
    out = []
    for scenario in sorted(set(a) & set(b)):
        rows_b = b[scenario]["data"].get("rows", [])
        for ra in a[scenario]["data"].get("rows", []):
            rb = next((r for r in rows_b if all(r.get(k) == ra.get(k) for k in IDENTITY)), None)
            if rb is None:
                continue
            fb = dict(figures(rb))
            for path, va in figures(ra):
                vb = fb.get(path)
                if vb is None:
                    continue
                na, nb = noise(ra, path), noise(rb, path)
                measured = [n for n in (na, nb) if n is not None]
                threshold = max(max(measured) if measured else assumed, min_change)
                ratio = vb / va if va else None
                changed = ratio is not None and abs(ratio - 1) > threshold
                out.append(
                    {
                        "scenario": scenario,
                        "row": row_name(ra),
                        "figure": path,
                        "a": va,
                        "b": vb,
                        "ratio": ratio,
                        "noise": threshold,
                        "noise_measured": bool(measured),
                        "changed": changed,
                    }
                )
    return out


def run(args: argparse.Namespace) -> int:
    a, b = load(args.run_a), load(args.run_b)
    if not a or not b:
        print(f"compare: no scenario results in {args.run_a if not a else args.run_b}")
        return 2
    entries = compare(a, b, args.min_change, args.assumed_noise)
    shown = [e for e in entries if args.all or e["changed"]]
    print(f"A = {args.run_a}\nB = {args.run_b}\n")
    only = sorted(set(a) ^ set(b))
    if only:
        print("in one run only: " + ", ".join(only) + "\n")
    table = [
        [
            e["scenario"],
            e["row"],
            e["figure"],
            f"{e['a']:,.3g}",
            f"{e['b']:,.3g}",
            f"{e['ratio']:.2f}×" if e["ratio"] is not None else "–",
            f"±{e['noise'] * 100:.0f} %" + ("" if e["noise_measured"] else " (assumed)"),
            "CHANGED" if e["changed"] else "",
        ]
        for e in shown
    ]
    print("\n".join(markdown_table(["scenario", "row", "figure", "A", "B", "B ÷ A", "noise", ""], table)))
    changed = sum(e["changed"] for e in entries)
    print(f"\n{len(entries)} figures compared, {changed} changed beyond the noise")
    return 1 if changed else 0
