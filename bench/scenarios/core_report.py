"""The core scenario's summary: figures from raw runs, the markdown table, the console table."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from wsfan.bench.results import markdown_table

TARGET_RATIO = 6.0
TARGET_US_PER_DELIVERY = 2.0
TARGET_KB_PER_CONN = 8.0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x * 100:.0f}%"


def _cores(runs: list[dict[str, Any]]) -> tuple[str, str, str]:
    """Server core, load-gen core (ours, +other tenants) and bottleneck of one figure, over all its runs.

    One cell per column however many runs (``--repeat 15`` used to repeat each cell 15 times): the
    median, its [min–max] when the runs differed, and each bottleneck with how many runs had it.
    """
    if not runs:
        return "", "", ""

    def side(key: str, other: str) -> str:
        ours = [r["interval"][key] for r in runs]
        others = [r["interval"][other] for r in runs if r["interval"].get(other) is not None]
        text = f"{_pct(_median(ours))} (+{_pct(_median(others))})"
        if len(ours) > 1 and min(ours) != max(ours):
            text += f" [{_pct(min(ours))}–{_pct(max(ours))}]"
        return text

    seen = Counter(r["interval"]["bottleneck"] for r in runs)
    bottleneck = "; ".join(
        b if len(runs) == 1 else f"{b} ({n} of {len(runs)} runs)" for b, n in seen.most_common()
    )
    return (
        side("server_util", "other_load_server_core"),
        side("loadgen_util", "other_load_client_core"),
        bottleneck,
    )


def _over_runs(values: list[float], fmt: str) -> str:
    """' (median of N runs, min–max)' when there was more than one run, else ''."""
    if len(values) < 2:
        return ""
    return f" (median of {len(values)} runs, {fmt.format(min(values))}–{fmt.format(max(values))})"


def _exit_note(runs: list[dict[str, Any]]) -> str:
    bad = [r["server_exit_code"] for r in runs if r.get("server_exit_code") != 0]
    return f"; server exit codes {bad} (expected 0)" if bad else ""


def summarize(
    results: dict[str, Any], subscribers: int, variants: tuple[str, ...] = ("wsfan", "naive")
) -> tuple[dict[str, Any], list[list[str]]]:
    summary: dict[str, Any] = {}
    rows: list[list[str]] = []
    fan = results.get("fanout", [])
    per_variant: dict[str, list[dict[str, Any]]] = {
        v: [r for r in fan if r["variant"] == v] for v in variants
    }
    for v in variants:
        runs = per_variant[v]
        if not runs:
            continue
        us = [r["server_us_per_delivery"] for r in runs if r["server_us_per_delivery"]]
        lg = [r["loadgen_us_per_delivery"] for r in runs if r["loadgen_us_per_delivery"]]
        rate = [r["deliveries_per_s"] for r in runs if r["deliveries_per_s"]]
        batch = [r["deliveries_per_write"] for r in runs if r["deliveries_per_write"]]
        med = _median(us)
        summary[f"{v}_us_per_delivery"] = med
        summary[f"{v}_us_per_delivery_runs"] = us
        summary[f"{v}_count_ok"] = all(r["count_ok"] for r in runs)
        received = sum(r["deliveries"] for r in runs)
        expected = sum(r["expected_deliveries"] for r in runs)
        check = (
            ("OK" if summary[f"{v}_count_ok"] else "FAIL")
            + f": received/expected = {received:,}/{expected:,}"
            + (f" over {len(runs)} runs" if len(runs) > 1 else "")
            + f" (publishes × {subscribers} subscribers),"
            + f" {sum(r['gaps'] for r in runs)} seq gaps"
            + _exit_note(runs)
        )
        user = [
            r["interval"]["server_user_s"] / r["interval"]["server_cpu_s"]
            for r in runs
            if r["interval"]["server_cpu_s"]
        ]
        srv, cli, bn = _cores(runs)
        label = "wsfan (corked)" if v == "wsfan" else "naive send-per-subscriber"
        target = f"≤ ~{TARGET_US_PER_DELIVERY:g} µs" if v == "wsfan" else ""
        value = f"{med:.2f} µs" + _over_runs(us, "{:.2f}")
        value += f" ({_median(user) or 0:.0%} user, rest kernel); {_median(rate) or 0:,.0f} deliveries/s"
        if batch:
            value += f"; {_median(batch):.1f} deliveries per write syscall"
        value += f"; load gen {(_median(lg) or 0):.2f} µs/delivery"
        rows.append([f"CPU per delivery, {label}", value, target, srv, cli, bn, check])
    w, n = summary.get("wsfan_us_per_delivery"), summary.get("naive_us_per_delivery")
    if w and n:
        ratio = n / w
        summary["naive_over_wsfan"] = ratio
        summary["ratio_target_met"] = ratio >= TARGET_RATIO
        rows.append(
            [
                "naive / wsfan CPU per delivery",
                f"{ratio:.1f}×",
                f"≥ {TARGET_RATIO:g}×",
                "",
                "",
                "",
                "PASS" if ratio >= TARGET_RATIO else "BELOW TARGET",
            ]
        )
    for r in results.get("memory", []):
        kb = r["bytes_per_connection"] / 1024
        summary[f"{r['variant']}_kb_per_idle_connection"] = kb
        target = f"< {TARGET_KB_PER_CONN:g} KB" if r["variant"] == "wsfan" else ""
        verdict = ("PASS" if kb < TARGET_KB_PER_CONN else "ABOVE TARGET") if r["variant"] == "wsfan" else ""
        rows.append(
            [
                f"idle memory per connection, {r['variant']} ({r['connections']:,} conns)",
                f"{kb:.2f} KB (RSS {r['rss_before'] / 2**20:.1f} → {r['rss_after'] / 2**20:.1f} MiB)",
                target,
                "",
                "",
                "",
                verdict + _exit_note([r]),
            ]
        )
    for r in results.get("echo", []):
        us = r["server_us_per_reply"]
        key = f"{r['variant']}_{r['mode']}_us_per_echo"
        summary[key] = us
        srv, cli, bn = _cores([r])
        what = "/ws {type:echo}" if r["mode"] == "protocol" else "/echo raw"
        rows.append(
            [
                f"CPU per echo reply, {r['variant']} {what}, {r['connections']} conns",
                f"{us:.2f} µs; {r['replies_per_s']:,.0f} replies/s"
                + (
                    f"; {r['replies_per_write']:.2f} replies per write syscall"
                    if r["replies_per_write"]
                    else ""
                )
                + f"; load gen {r['loadgen_us_per_reply']:.2f} µs/reply",
                "",
                srv,
                cli,
                bn,
                f"{r['replies']:,} replies, {r['errors']} errors" + _exit_note([r]),
            ]
        )
    return summary, rows


HEADER = [
    "Figure",
    "Value",
    "Target",
    "Server core: ours (+other)",
    "Load-gen core: ours (+other)",
    "Bottleneck",
    "Check",
]


def markdown(rows: list[list[str]], payload: dict[str, Any]) -> str:
    m = payload["machine"]
    s = payload["settings"]
    lines = [
        f"# Core benchmark — {payload['started_at']}",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} CPUs ({m['hypervisor'] or '?'}), Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f" (picows on aiofastnet: {m['picows_uses_aiofastnet']})"
        + f"; git {str(m['git_commit'])[:10]}{' + uncommitted changes' if m['git_dirty'] else ''}.",
        f"Settings: {s['subscribers']} subscribers, {s['inflight']} publishes in flight, {s['payload_size']} B payload, "
        f"≤ {s['publishes']} publishes or {s['duration']:g} s per run, {s['repeat']} run(s) per variant, "
        f"{s['client_procs']} load-gen process(es); server on CPU {s['server_cpu']}, load gen on CPU {s['client_cpu']}"
        f"{' (quick mode)' if s['quick'] else ''}.",
        f"Load average before → after: {payload['loadavg_before']} → {payload['loadavg_after']}.",
        "",
        "Core columns: CPU time of our process over wall time, and (+) the rest of that core's busy time "
        "(other processes: a non-zero value means the figure is noisy). A side at ≥ 90% of its core is "
        'called the bottleneck; "(shared core)" means it was full only with other processes\' help. '
        "µs figures are server CPU (utime + stime) divided by deliveries / replies counted by the clients.",
        "",
    ]
    lines += markdown_table(HEADER, rows)
    if s["quick"]:
        lines += ["", "Quick mode (CI smoke test): short runs, figures are indicative only."]
    return "\n".join(lines) + "\n"


def print_table(rows: list[list[str]]) -> None:
    for row in rows:
        print(f"- {row[0]}: {row[1]}")
        extra = [f"{h.lower()}: {c}" for h, c in zip(HEADER[2:], row[2:], strict=True) if c]
        if extra:
            print("    " + " | ".join(extra))
