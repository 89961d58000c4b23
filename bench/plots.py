"""PNG plots from the scenario JSON files alone (raw samples are gone by then; histograms are enough).

Headless (Agg backend). Each function returns the file it wrote, or None when
the JSON has nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from wsfan.bench.latency import curve  # noqa: E402
from wsfan.bench.servers import ALL  # noqa: E402

STYLE = {
    "wsfan": {"color": "#1f77b4", "marker": "o", "linestyle": "-"},
    "wsfan-cork1": {"color": "#17becf", "marker": "s", "linestyle": "-"},
    "wsfan-afn": {"color": "#9467bd", "marker": "D", "linestyle": "-"},
    "naive": {"color": "#ff7f0e", "marker": "v", "linestyle": "--"},
    "websockets": {"color": "#d62728", "marker": "^", "linestyle": "--"},
    "bun": {"color": "#2ca02c", "marker": "P", "linestyle": "--"},
}


def _label(key: str) -> str:
    v = ALL.get(key)
    return v.label if v else key


def _nines(p: float, top: float) -> float:
    """x position of percentile p on a "nines" axis (50 % → 0.3, 99 % → 2, 99.9 % → 3); max at ``top``."""
    return top if p >= 100 else -math.log10(1 - p / 100)


def _latency_axes(ax: Any, top: float) -> None:
    ticks = [(0.301, "50%"), (1, "90%"), (2, "99%"), (3, "99.9%"), (4, "99.99%")]
    ticks = [t for t in ticks if t[0] < top - 0.5] + [(top, "max")]
    ax.set_xticks([t for t, _ in ticks], [lbl for _, lbl in ticks])
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("percentile")


def _curves(ax: Any, series: list[tuple[str, dict[str, Any]]], title: str) -> bool:
    top = 4.8
    drawn = False
    for key, lat in series:
        if not lat or not lat.get("count"):
            continue
        pts = [
            (p, v / 1000)
            for p, v in curve(lat["histogram"])
            if 50 <= p < 100 and (1 - p / 100) * lat["count"] >= 1
        ]
        pts.append((100, lat["max"] / 1000))
        style = STYLE.get(key, {})
        ax.plot(
            [_nines(p, top) for p, _ in pts], [v for _, v in pts], label=_label(key), markersize=4, **style
        )
        drawn = True
    _latency_axes(ax, top)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("latency (ms, log)")
    return drawn


def echo_latency(data: dict[str, Any], out: Path) -> Path | None:
    rows = data.get("rows", [])
    loads = list(dict.fromkeys(r["load"] for r in rows))
    if not loads:
        return None
    fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 4), squeeze=False)
    conns = next((r.get("connections") for r in rows if r.get("connections")), None)
    for ax, load in zip(axes[0], loads, strict=True):
        kind = f"closed loop, {conns} conns × 1 in flight" if load == "max" else "open loop"
        _curves(
            ax,
            [(r["variant"], r["latency"]) for r in rows if r["load"] == load],
            f"echo RTT at {load} ({kind})",
        )
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Echo round trip: latency by percentile (from the intended send time in open loop)")
    fig.tight_layout()
    path = out / "echo_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fanout_latency(data: dict[str, Any], out: Path) -> Path | None:
    rows = [r for r in data.get("rows", []) if r["phase"] == "latency"]
    sizes = sorted({r["size"] for r in rows})
    if not sizes:
        return None
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        sel = [r for r in rows if r["size"] == size]
        offered = sel[0]["offered_deliveries_per_s"] if sel else 0
        _curves(
            ax, [(r["variant"], r["latency"]) for r in sel], f"room of {size:,} ({offered:,.0f} deliveries/s)"
        )
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fan-out: publish-to-delivery latency by percentile, fixed offered load (open loop)")
    fig.tight_layout()
    path = out / "fanout_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fanout_cpu(data: dict[str, Any], out: Path) -> Path | None:
    rows = [r for r in data.get("rows", []) if r["phase"] == "throughput" and r["server_us_per_delivery"]]
    if not rows:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for key in dict.fromkeys(r["variant"] for r in rows):
        sel = sorted((r for r in rows if r["variant"] == key), key=lambda r: r["size"])
        style = STYLE.get(key, {})
        ax.plot(
            [r["size"] for r in sel], [r["server_us_per_delivery"] for r in sel], label=_label(key), **style
        )
        ax2.plot([r["size"] for r in sel], [r["deliveries_per_s"] for r in sel], label=_label(key), **style)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.grid(True, which="both", alpha=0.3)
        a.set_xlabel("subscribers in the room (log)")
    ax.set_ylabel("server CPU µs per delivery (log)")
    ax.set_title("Server CPU per delivery (lower is better)", fontsize=10)
    ax2.set_ylabel("deliveries/s (log)")
    ax2.set_title("Delivery rate, closed loop (bottleneck in the tables)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "fanout_cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heartbeat_cpu(data: dict[str, Any], out: Path) -> Path | None:
    rows = data.get("rows", [])
    if not rows:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    colors = {1000: "#d62728", 5000: "#ff7f0e", 30000: "#1f77b4", 0: "#7f7f7f"}
    for key in dict.fromkeys(r["variant"] for r in rows):
        for hb in dict.fromkeys(r["heartbeat_ms"] for r in rows):
            sel = sorted(
                (r for r in rows if r["variant"] == key and r["heartbeat_ms"] == hb),
                key=lambda r: r["connections"],
            )
            if not sel:
                continue
            ls = "-" if key == "wsfan" else "--"
            name = f"{_label(key)}, {'off' if hb == 0 else f'{hb / 1000:g} s'}"
            kw = {
                "color": colors.get(hb),
                "linestyle": ls,
                "marker": "o" if key == "wsfan" else "^",
                "label": name,
            }
            ax.plot([r["connections"] for r in sel], [max(r["server_cpu_pct"], 1e-3) for r in sel], **kw)
            ax2.plot([r["connections"] for r in sel], [r["bytes_per_connection"] / 1024 for r in sel], **kw)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("idle connections (log)")
    ax.set_ylabel("server CPU % of one core (log)")
    ax.set_title("Heartbeat CPU vs connections, per interval (0 drawn at 0.001 %)", fontsize=10)
    ax2.set_xscale("log")
    ax2.set_xlabel("idle connections (log)")
    ax2.set_ylabel("RSS per connection (KB)")
    ax2.set_title("Memory per idle connection", fontsize=10)
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "heartbeat_cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def storm_recovery(data: dict[str, Any], out: Path) -> Path | None:
    results = data.get("results", [])
    events = list(dict.fromkeys(r["event"] for r in results))
    if not events:
        return None
    fig, axes = plt.subplots(1, len(events), figsize=(6 * len(events), 4.6), squeeze=False)
    notes = []
    for ax, event in zip(axes[0], events, strict=True):
        mine = [r for r in results if r["event"] == event]
        # The x range follows the crowd; a few clients far behind it (they noticed the reset only at
        # their own ping, ~20 s later) are listed under the plot instead of squashing it.
        t99 = max((r["crowd"]["t99_s"] or 0.0 for r in mine), default=1.0)
        cut = 3 * t99 + 0.5
        right = (
            max((x for r in mine for x in r["crowd"]["back_offsets_s"] if x <= cut), default=1.0) * 1.05 + 0.1
        )
        for r in mine:
            c = r["crowd"]
            xs = c["back_offsets_s"]
            n = c["clients"]
            if not xs:
                continue
            color = "#1f77b4" if r["jitter"] else "#d62728"
            ls = "--" if r["admission"] else "-"
            name = f"{'full jitter' if r['jitter'] else 'no jitter'}, admission {'on' if r['admission'] else 'off'}"
            ys = [(i + 1) / n for i in range(len(xs))]
            ax.step([0.0, *xs], [0.0, *ys], where="post", color=color, linestyle=ls, label=name)
            late = [x for x in xs if x > right]
            if late:
                why = " (found the dead connection at their own ping)" if c.get("late_detection") else ""
                notes.append(
                    f"{event}, {name}: {len(late)} client(s) back at {min(late):.1f}-{max(late):.1f} s{why}"
                )
        ax.set_xlim(0, right)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("seconds since the disruption")
        ax.set_ylabel("fraction reconnected and rejoined")
        title = (
            "server restarted (SIGTERM, new process)"
            if event == "restart"
            else "every connection reset (ss -K, server stays up)"
        )
        ax.set_title(f"{title}, {mine[0]['crowd']['clients']:,} clients", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if notes:
        fig.subplots_adjust(bottom=0.14 + 0.035 * len(notes))
        fig.text(
            0.01,
            0.01,
            "Off the right edge: " + "; ".join(notes[:1]) + "".join("\n" + n for n in notes[1:]),
            fontsize=7.5,
            va="bottom",
        )
    path = out / "storm_recovery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {
    "fanout": (fanout_cpu, fanout_latency),
    "echo": (echo_latency,),
    "heartbeat": (heartbeat_cpu,),
    "storm": (storm_recovery,),
}
