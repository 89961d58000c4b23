"""``report.md`` and the plots of one run folder, rebuilt from its JSON files (``python -m wsfan.bench report DIR``).

Every figure of ours is given as a ratio to each baseline measured in the same
run: ratio = our figure ÷ the baseline's. For CPU, latency, memory and time
lower is better, so a ratio below 1 means "better than the baseline"; for rates
(deliveries/s, handshakes/s) a ratio above 1 is better. Every figure also says
which side was the bottleneck.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsfan.bench.harness import LAG_LIMIT_US, cores
from wsfan.bench.latency import fmt_us
from wsfan.bench.plots import PLOTS
from wsfan.bench.results import markdown_table
from wsfan.bench.scenarios import compression
from wsfan.bench.servers import ALL, BASELINES

ORDER = ("fanout", "echo", "heartbeat", "storm", "connect", "cluster", "compression", "rooms")


def _label(key: str) -> str:
    v = ALL.get(key)
    return v.label if v else key


def ratio_text(value: float | None, base: dict[str, float | None]) -> str:
    """'naive 0.18× · websockets 0.07×' for every baseline with a figure (a baseline commit's after them)."""
    parts = []
    for key in [*BASELINES, *(k for k in base if k not in BASELINES)]:
        b = base.get(key)
        if key in base and value is not None and b:
            r = value / b
            parts.append(f"{_label(key)} {r:.2f}×" if r < 10 else f"{_label(key)} {r:.0f}×")
    return " · ".join(parts) if parts else "—"


def _baselines(
    rows: list[dict[str, Any]], match: Callable[[dict[str, Any]], bool], metric: str, own: str | None = None
) -> dict[str, float | None]:
    """The baselines' figures for the same measurement (a baseline's own row is not compared with itself)."""
    return {
        r["variant"]: _get(r, metric)
        for r in rows
        if _is_baseline(r["variant"]) and r["variant"] != own and match(r)
    }


def _is_baseline(variant: str) -> bool:
    """A baseline server, or wsfan at a baseline commit (``wsfan@<sha>``, see bench/baselines/commit.py)."""
    return variant in BASELINES or variant.startswith("wsfan@")


def _get(r: dict[str, Any], metric: str) -> Any:
    v: Any = r
    for part in metric.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if v is None else fmt.format(v)


# ---------------------------------------------------------------- sections


def fanout_section(doc: dict[str, Any]) -> list[str]:
    rows = doc["data"]["rows"]
    s = doc["settings"]
    thr = [r for r in rows if r["phase"] == "throughput"]
    lat = [r for r in rows if r["phase"] == "latency"]
    out = [
        "## Fan-out",
        "",
        f"One publisher, rooms of {', '.join(f'{x:,}' for x in s['sizes'])} subscribers (plain picows load generator), "
        f"{s['payload_size']} B payloads. Throughput: closed loop, {s['inflight']} publishes in flight, up to "
        f"{s['target_deliveries']:,} deliveries or {s['max_duration']:g} s per room. Server CPU per delivery = server "
        "CPU time (user + system, whole process tree) over deliveries counted by the subscribers.",
        "",
        "![CPU per delivery vs room size](./fanout_cpu.png)",
        "",
        "### Throughput (closed loop)",
        "",
    ]
    table = []
    for r in thr:
        same = lambda b, r=r: b["size"] == r["size"] and b["phase"] == "throughput"  # noqa: E731
        table.append(
            [
                f"{r['size']:,}",
                _label(r["variant"]),
                _num(r["deliveries_per_s"]),
                _num(r["server_us_per_delivery"], "{:.2f}"),
                ratio_text(
                    r["server_us_per_delivery"],
                    _baselines(rows, same, "server_us_per_delivery", r["variant"]),
                ),
                ratio_text(r["deliveries_per_s"], _baselines(rows, same, "deliveries_per_s", r["variant"])),
                *capacity(r),
                _check(r),
            ]
        )
    out += markdown_table(
        [
            "room",
            "server",
            "deliveries/s",
            "server µs/delivery",
            "µs/delivery ÷ baseline",
            "deliveries/s ÷ baseline",
            *CAPACITY_COLUMNS,
            "check",
        ],
        table,
    )
    out += [
        "",
        "### Latency at a fixed offered load (open loop)",
        "",
        f"Offered {s['latency_load']:,} deliveries/s per room (publish rate = load ÷ room size, at most "
        f"{s['max_publish_rate']:,}/s) for {s['latency_duration']:g} s. Latency = delivery arrival − the publish's "
        "*intended* send time, so nothing is hidden by a sender that fell behind (no coordinated omission). "
        "On loopback the server's kernel also does the receiving side's TCP work for each write, so the last "
        "subscriber of a big room waits for the writes to all the others: that spread is most of the latency "
        "of large rooms, for every server.",
        "",
        "![fan-out latency percentiles](./fanout_latency.png)",
        "",
    ]
    table = []
    for r in lat:
        same = lambda b, r=r: b["size"] == r["size"] and b["phase"] == "latency"  # noqa: E731
        L = r["latency"]
        table.append(
            [
                f"{r['size']:,}",
                _label(r["variant"]),
                _num(r["offered_deliveries_per_s"]),
                fmt_us(L.get("p50")),
                fmt_us(L.get("p90")),
                fmt_us(L.get("p99")),
                fmt_us(L.get("p99_9")),
                fmt_us(L.get("max")),
                ratio_text(L.get("p99"), _baselines(rows, same, "latency.p99", r["variant"])),
                _num(r["server_us_per_delivery"], "{:.2f}"),
                ratio_text(
                    r["server_us_per_delivery"],
                    _baselines(rows, same, "server_us_per_delivery", r["variant"]),
                ),
                r["interval"]["bottleneck"],
                _check(r),
            ]
        )
    out += markdown_table(
        [
            "room",
            "server",
            "offered del/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "p99 ÷ baseline",
            "CPU µs/del at this load",
            "CPU ÷ baseline",
            "bottleneck",
            "check",
        ],
        table,
    )
    return out + _variant_tradeoffs(rows) + [""]


def _variant_tradeoffs(rows: list[dict[str, Any]]) -> list[str]:
    """--cork-ms and --aiofastnet against the default server, as ratios."""
    out = []
    for key in ("wsfan-cork1", "wsfan-afn"):
        if not any(r["variant"] == key for r in rows):
            continue
        cells = []
        for r in (r for r in rows if r["variant"] == key):
            ref = next(
                (
                    b
                    for b in rows
                    if b["variant"] == "wsfan" and b["size"] == r["size"] and b["phase"] == r["phase"]
                ),
                None,
            )
            if ref is None or not ref["server_us_per_delivery"] or not r["server_us_per_delivery"]:
                continue
            cpu = r["server_us_per_delivery"] / ref["server_us_per_delivery"]
            text = f"{r['size']:,} {r['phase']}: CPU {cpu:.2f}×"
            if r["phase"] == "latency" and ref["latency"].get("p99") and r["latency"].get("p99"):
                text += f", p50 {r['latency']['p50'] / ref['latency']['p50']:.2f}×, p99 {r['latency']['p99'] / ref['latency']['p99']:.2f}×"
            else:
                text += f", rate {r['deliveries_per_s'] / ref['deliveries_per_s']:.2f}×"
            cells.append(text)
        if cells:
            out += ["", f"**{_label(key)} ÷ wsfan (same run):** " + "; ".join(cells) + "."]
    return out


#: The last columns of every measured row: whose core was busy, and what limited the figure.
CAPACITY_COLUMNS = ("cores: ours (+others)", "bottleneck")


def capacity(r: dict[str, Any]) -> list[str]:
    """A row's ``CAPACITY_COLUMNS`` cells, from its measured interval."""
    return [cores(r["interval"]), r["interval"]["bottleneck"]]


def _check(r: dict[str, Any]) -> str:
    ok = r["count_ok"]
    text = f"{'OK' if ok else 'FAIL'}: {r['deliveries']:,}/{r['expected_deliveries']:,}, {r['gaps']} gaps"
    if r.get("server_exit_code") not in (0, None):
        text += f", exit {r['server_exit_code']}"
    return text


def echo_section(doc: dict[str, Any]) -> list[str]:
    rows = doc["data"]["rows"]
    s = doc["settings"]
    out = [
        "## Echo round trip",
        "",
        f'{s["connections"]} connections, {s["payload_size"]} B payloads, `{{"type":"echo"}}` on `/ws`. Open loop at '
        f"{', '.join(f'{x:,}' for x in s['rates'])} requests/s for {s['duration']:g} s each, latency from the intended "
        f'send time; "max" = closed loop, one request in flight per connection, {s["max_duration"]:g} s, latency from '
        f"the actual send. Open-loop bottleneck: the load generator if its p99 send lag exceeded "
        f"{LAG_LIMIT_US / 1000:g} ms, the server if its core was ≥ 90 % busy or replies were missing.",
        "",
        "![echo latency percentiles](./echo_latency.png)",
        "",
    ]
    table = []
    for r in rows:
        same = lambda b, r=r: b["load"] == r["load"]  # noqa: E731
        L = r["latency"]
        table.append(
            [
                r["load"],
                _label(r["variant"]),
                _num(r["achieved_rate"]),
                fmt_us(L.get("p50")),
                fmt_us(L.get("p90")),
                fmt_us(L.get("p99")),
                fmt_us(L.get("p99_9")),
                fmt_us(L.get("max")),
                ratio_text(L.get("p99"), _baselines(rows, same, "latency.p99", r["variant"])),
                ratio_text(r["achieved_rate"], _baselines(rows, same, "achieved_rate", r["variant"]))
                if r["load"] == "max"
                else "",
                _num(r["server_us_per_reply"], "{:.1f}"),
                *capacity(r),
                f"{r['received']:,}/{r['sent']:,} answered, {r['errors']} errors",
            ]
        )
    out += markdown_table(
        [
            "load",
            "server",
            "replies/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "p99 ÷ baseline",
            "rate ÷ baseline",
            "server µs/reply",
            *CAPACITY_COLUMNS,
            "check",
        ],
        table,
    )
    return out + [""]


def heartbeat_section(doc: dict[str, Any]) -> list[str]:
    rows = doc["data"]["rows"]
    s = doc["settings"]
    out = [
        "## Heartbeat overhead (idle connections)",
        "",
        f"All servers of one connection count run side by side on the server core, each with its own idle "
        f"connections (plain picows clients that answer pings), measured over the same {s['window']:g} s window "
        "(≥ the longest interval). CPU % = server CPU time ÷ window. wsfan pings a connection after a full interval "
        "of silence (sweep every ¼ interval, at most 1 s), websockets every `ping_interval`. "
        f"Baselines run up to {s['baseline_max_count']:,} connections; the largest count is what one process can "
        f"hold here (open-file limit {doc['data'].get('max_connections', 0) + 500:,}).",
        "",
        "![heartbeat CPU vs connections](./heartbeat_cpu.png)",
        "",
    ]
    table = []
    for r in rows:
        same = lambda b, r=r: b["connections"] == r["connections"] and b["heartbeat_ms"] == r["heartbeat_ms"]  # noqa: E731
        hb = "off" if r["heartbeat_ms"] == 0 else f"{r['heartbeat_ms'] / 1000:g} s"
        table.append(
            [
                f"{r['connections']:,}",
                hb,
                _label(r["variant"]),
                f"{r['server_cpu_pct']:.2f}%",
                ratio_text(
                    r["server_cpu_pct"] or None, _baselines(rows, same, "server_cpu_pct", r["variant"])
                ),
                _num(r["pings_per_s"]),
                _num(r["server_us_per_ping"], "{:.1f}"),
                f"{r['bytes_per_connection'] / 1024:.2f}",
                ratio_text(
                    r["bytes_per_connection"], _baselines(rows, same, "bytes_per_connection", r["variant"])
                ),
                f"{(r['server_core_busy'] or 0) * 100:.0f}% ({r['servers_side_by_side']} servers)",
                "server" if (r["server_core_busy"] or 0) >= 0.9 else "neither (idle)",
                f"{r['open_at_end']:,}/{r['connections']:,} open",
            ]
        )
    out += markdown_table(
        [
            "conns",
            "heartbeat",
            "server",
            "CPU % of a core",
            "CPU ÷ baseline",
            "pings/s",
            "µs/ping",
            "KB/conn (RSS)",
            "KB ÷ baseline",
            "server core busy",
            "bottleneck",
            "check",
        ],
        table,
    )
    return out + [""]


def label(r: dict[str, Any]) -> str:
    jitter = "full jitter" if r["jitter"] else "no jitter"
    return f"{r['event']}, {jitter}, admission {'on' if r['admission'] else 'off'}"


def _rejoin_span(r: dict[str, Any]) -> float:
    """Seconds from the first to the last client back: how bunched the crowd returned."""
    offsets = r["crowd"]["back_offsets_s"]
    return offsets[-1] - offsets[0] if offsets else 0.0


def storm_section(doc: dict[str, Any]) -> list[str]:
    results = doc["data"]["results"]
    s = doc["settings"]
    out = [
        "## Reconnection storm",
        "",
        f"{s['clients']:,} clients of the project's asyncio client (`client/`: its real backoff, Retry-After and "
        f"rejoin-with-since logic; base {s['backoff_base']:g} s, cap {s['backoff_cap']:g} s) in {s['rooms']} rooms; "
        f"a publisher sends {s['publish_rate']:g} messages/s throughout. *restart*: SIGTERM (drain, close 1001), new "
        "process on the same port, in-process history gone (the room is renumbered from 1). *drop*: the server's end "
        "of every subscriber connection killed with `ss -K`, so each client gets a TCP reset (the publisher's "
        "connection is spared); server and history stay. *reload-abrupt* / *reload-spread*: SIGHUP to a "
        "`--workers 2` supervisor behind Redis (zero-downtime restart): new workers take the port, the old ones "
        f"close with 1001 all at once or spread over {s.get('reload_spread', 10):g} s. No jitter = the same client with plain exponential backoff. "
        "Admission on "
        f"= `--max-handshake-rate {s['handshake_rate']:g} --max-connections {s['max_connections_factor']:g}×N` "
        "(503 + Retry-After). Times are from the disruption until a client was reconnected *and* its room rejoined; "
        '"away" = messages published while a client was away, recovered from history or lost.',
        "",
        "![storm recovery](./storm_recovery.png)",
        "",
    ]
    table = []

    def t(x: float | None) -> str:
        return "not reached" if x is None else f"{x:.2f} s"

    for r in results:
        c, m = r["crowd"], r["messages"]
        table.append(
            [
                r["event"],
                "full" if r["jitter"] else "none",
                "on" if r["admission"] else "off",
                t(c["t50_s"]),
                t(c["t90_s"]),
                t(c["t99_s"]),
                t(c["t100_s"]),
                f"{c['fraction_back']:.1%}",
                f"{c['attempts_mean']:.1f} / {c['attempts_max']}",
                f"{c['rejected_503']:,}",
                f"{m['published_while_away']:,}",
                f"{m['recovered']:,}",
                f"{m['lost']:,}",
                f"{r.get('tcp', {}).get('ListenOverflows', 0):,}",
                f"{r['server_util']:.0%} / {r['loadgen_util']:.0%}",
                r["bottleneck"],
            ]
        )
    out += markdown_table(
        [
            "event",
            "jitter",
            "admission",
            "50% back",
            "90%",
            "99%",
            "100%",
            "back by timeout",
            "attempts mean/max",
            "503s",
            "away",
            "recovered",
            "lost",
            "SYNs dropped (listen queue full)",
            "CPU server / load gen",
            "bottleneck",
        ],
        table,
    )
    reloads = {r["event"]: r for r in results if r["event"].startswith("reload")}
    if len(reloads) == 2:
        a, b = reloads["reload-abrupt"], reloads["reload-spread"]
        out += [
            "",
            "Zero-downtime restart, abrupt vs spread: all rejoined after "
            f"{t(a['crowd']['t100_s'])} vs {t(b['crowd']['t100_s'])}; server CPU (supervisor and every worker, "
            f"old and new) {a['server_cpu_s']:.2f} s vs {b['server_cpu_s']:.2f} s, on average "
            f"{a['server_util']:.0%} vs {b['server_util']:.0%} of a core over the recovery window; first to last "
            f"rejoin {_rejoin_span(a):.2f} s vs {_rejoin_span(b):.2f} s (the new workers start first: that "
            "time is in both).",
        ]
    late = [r for r in results if r["crowd"].get("late_detection")]
    if late:
        out += [
            "",
            "Late detection: "
            + ", ".join(f"{r['crowd']['late_detection']} client(s) in *{label(r)}*" for r in late)
            + " noticed the loss only when their own ping (client `ping_interval`, 20 s by default) found the "
            "connection dead, although the kernel counted a reset for every connection (`EstabResets` under `tcp` "
            "in storm.json); their event timelines are under `stragglers`. The client's heartbeat is what bounds "
            "the 100 % column after a reset.",
        ]
    if any(r.get("tcp", {}).get("ListenOverflows") for r in results):
        out += [
            "",
            "SYNs dropped: the kernel's count of connection attempts refused because the server's listen "
            "queue was full (machine-wide `ListenOverflows`, so other processes' would count too). Each "
            "such client's kernel retries its SYN after 1 s, which is the step near 1 s after the first "
            "wave in the curves. The queue is the listen backlog: asyncio's default of 100 unless the "
            "server asks for more.",
        ]
    restart = [r for r in results if r["event"] == "restart" and "server_down_s" in r]
    if restart:
        out += [
            "",
            "Restart downtime (SIGTERM until the new process accepted): "
            + ", ".join(f"{r['server_back_after_s']:.2f} s" for r in restart)
            + ". After a restart the room's numbering starts over; a client that rejoins is told so (a `Gap` with "
            '`reset`) and gets what the new process\'s history holds; the "lost" column counts what it still missed. '
            "After a drop, everything published while away is in the history it rejoins with `since`.",
        ]
    return out + [""]


def _spread(r: dict[str, Any], key: str, fmt: str) -> str:
    """A row's median figure, with its min–max over the repetitions when they differed."""
    v = r.get(key)
    if v is None:
        return "—"
    text = fmt.format(v)
    lo_med_hi = (r.get("spread") or {}).get(key)
    if lo_med_hi:
        text += f" ({fmt.format(lo_med_hi[0])}–{fmt.format(lo_med_hi[2])})"
    return text


#: The crowd figures compared between servers: (row key, short name); for connects/s higher is better.
CROWD_FIGURES = (
    ("server_us_per_connect", "CPU"),
    ("connects_per_s", "conn/s"),
    ("t100_s", "all back"),
    ("kb_per_connection", "KB"),
)


def _crowd_ratios(r: dict[str, Any], other: dict[str, Any] | None) -> str:
    if other is None or other is r:
        return "—"
    parts = [f"{name} {_ratio(r.get(k), other.get(k))}" for k, name in CROWD_FIGURES]
    return " · ".join(parts)


def _crowd_peer(rows: list[dict[str, Any]], r: dict[str, Any], variant: str | None) -> dict[str, Any] | None:
    """The row of ``variant`` (with the same worker suffix as ``r``) for the same crowd size and wave."""
    if variant is None:
        return None
    if r["variant"].endswith("-w2") and not variant.endswith("-w2"):
        variant += "-w2"
    return next(
        (b for b in rows if b["variant"] == variant and b["size"] == r["size"] and b["phase"] == r["phase"]),
        None,
    )


def _core_limits(r: dict[str, Any]) -> str:
    """The connect rate each side's CPU per connect allows on one full core, and which side that caps first.

    1e6 ÷ µs per connect: on a loaded machine neither side may reach its core's limit, but these
    say which would saturate first on a quiet one (the load generators share one core; a
    --workers 2 server's workers share one too, and its redis-server is counted with it here).
    """
    server = (r.get("server_us_per_connect") or 0) + (r.get("redis_us_per_connect") or 0)
    loadgen = r.get("loadgen_us_per_connect") or 0
    if not server or not loadgen:
        return "—"
    first = "server" if server > loadgen else "load gen"
    return f"{1e6 / server:,.0f} / {1e6 / loadgen:,.0f}: {first} first"


def _crowd_label(variant: str) -> str:
    """'wsfan --workers 2' for 'wsfan-w2', 'wsfan@03ec708' as it is."""
    workers = variant.endswith("-w2")
    key = variant.removesuffix("-w2")
    return (_label(key) if key in ALL else key) + (" --workers 2" if workers else "")


def connect_section(doc: dict[str, Any]) -> list[str]:
    rows = doc["data"]["rows"]
    s = doc["settings"]
    base = next((r["variant"] for r in rows if r["variant"].startswith("wsfan@")), None)
    base = base.removesuffix("-w2") if base else None
    repeats = doc["data"].get("repeats", 1)
    out = [
        "## Reconnection storm cost: a crowd connects and joins at once",
        "",
        "Each crowd: N bare WebSocket clients (uvloop transports, bench/roles/crowd.py) over ⌈N ÷ 19,000⌉ load-generator processes (one process may hold "
        "20,000 files here) and many 127.a.b.1 source addresses, all on the load-generator core; every client "
        f"connects, sends its join (rooms spread over {s['rooms']}) as soon as the upgrade is answered, and is "
        "*rejoined* when the join ack arrives; at most "
        f"{s['concurrency']:,} handshakes in flight in all. *connect*: the crowd arrives at a fresh server; "
        "*reconnect*: the whole crowd dropped its TCP connections at once, the server was left to clean up "
        "until its CPU was quiet, then the crowd came back at once (the reconnection storm). Server CPU per "
        "connect + join = the server process tree's utime + stime (/proc) over the wave ÷ clients rejoined; "
        "all back = last join ack − go; connects/s = rejoined ÷ that time; KB per idle connection = (RSS with "
        "the crowd joined and idle − RSS before the first wave) ÷ clients. The largest single-process size is "
        f"what one process can hold here ({doc['data'].get('max_connections', 0):,}); `-w2` = `--workers 2` "
        "behind a private redis-server, both workers on the server core. "
        + (
            f"Baseline commit: {doc['data'].get('baseline')} (started from a `git archive` of it, same venv). "
            if base
            else ""
        )
        + (
            f"Figures are medians of {repeats} repetitions, (min–max) where they differed."
            if repeats > 1
            else "One repetition."
        ),
        "",
    ]
    table = []
    for r in rows:
        bun = _crowd_peer(rows, r, "bun") if not r["variant"].startswith("bun") else None
        floor = _crowd_peer(rows, r, "naive") if not r["variant"].startswith(("bun", "naive")) else None
        old = _crowd_peer(rows, r, base) if base and not r["variant"].startswith(("wsfan@", "bun")) else None
        table.append(
            [
                f"{r['size']:,}",
                r["phase"],
                _crowd_label(r["variant"]),
                f"{r['rejoined']:,}/{r['size']:,}",
                _spread(r, "server_us_per_connect", "{:,.0f}")
                + (f" + redis {r['redis_us_per_connect']:,.0f}" if r.get("redis_us_per_connect") else ""),
                _spread(r, "loadgen_us_per_connect", "{:,.0f}"),
                _core_limits(r),
                _spread(r, "connects_per_s", "{:,.0f}"),
                _spread(r, "t50_s", "{:.2f}"),
                _spread(r, "t100_s", "{:.2f}"),
                _spread(r, "kb_per_connection", "{:.2f}"),
                _crowd_ratios(r, bun),
                _crowd_ratios(r, floor),
                _crowd_ratios(r, old),
                *capacity(r),
            ]
        )
    out += markdown_table(
        [
            "clients",
            "wave",
            "server",
            "rejoined",
            "server µs per connect+join",
            "load gen µs per connect",
            "one core's worth: server / load gen (connects/s)",
            "connects/s",
            "50% back (s)",
            "all back (s)",
            "KB per idle conn",
            "÷ Bun (same run)",
            "÷ naive picows: the floor of picows on uvloop (same run)",
            f"÷ {base or 'baseline'} (same run)",
            *CAPACITY_COLUMNS,
        ],
        table,
    )
    out += [
        "",
        "Ratios are this row ÷ the other server's row for the same crowd and wave: below 1 is better for CPU, "
        "all back and KB, above 1 for connects/s. Bun holds one process only, so the `-w2` crowds compare with "
        "the baseline commit's `-w2` alone. The naive picows server (bench/baselines/naive_picows.py: picows' "
        "own upgrade, a welcome and the join's ack, nothing else per connection) is the floor of picows on "
        "uvloop for CPU: wsfan ÷ naive is what wsfan adds on top of its stack (not for KB: it keeps "
        "picows' default 16 KiB read buffer per connection, wsfan 2 KiB); it runs up to "
        f"{s.get('baseline_max_size', 10_000):,} clients. The bottleneck column names the side whose core was ≥ 90 % busy "
        'over the wave (the load generators are several processes sharing one core); "one core\'s worth" is '
        "1e6 ÷ each side's CPU per connect, the rate at which that side would fill its core, so the side with "
        "the lower figure is the one that saturates first even when other work shared the cores (a server "
        "cheaper per connect than the load generator, as Bun is, cannot be saturated by this bench: its "
        "connects/s and times are the load generator's).",
    ]
    return out + [""]


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def _proc_us(r: dict[str, Any], name: str) -> str:
    procs = r.get("processes") or {}
    p = procs.get(name)
    if p is None and name == "redis":
        # shards mode: the busiest master, the one that owns the room (the per-shard cost)
        shards = [v for k, v in procs.items() if k.startswith("redis-") and v.get("cpu_s") is not None]
        p = max(shards, key=lambda v: v["cpu_s"], default=None)
    return "—" if not p else _num(p["us_per_delivery"], "{:.2f}") + f" ({(p['util'] or 0) * 100:.0f}%)"


def cluster_section(doc: dict[str, Any]) -> list[str]:
    rows = doc["data"]["rows"]
    s = doc["settings"]
    out = [
        "## Cluster: two nodes behind one Redis vs one node",
        "",
        f"Room of {', '.join(f'{x:,}' for x in s['sizes'])} subscribers, {s['payload_size']} B payloads. *cluster*: a "
        "private `redis-server` (no persistence) and two wsfan nodes with `--broker redis://…`; the publisher on node "
        "A, the subscribers split in half over A and B. *single*: one node, in-process broker, the same load "
        "generators all on it. Same two phases as the fan-out scenario: closed-loop throughput "
        f"({s['inflight']} publishes in flight, up to {s['target_deliveries']:,} deliveries or "
        f"{s['max_duration']:g} s) and open-loop latency at {s['latency_load']:,} offered deliveries/s for "
        f"{s['latency_duration']:g} s (latency from the intended send time).",
        "",
        "**Pinning (2 cores):** node A, node B *and* redis-server all on CPU 0, the three load-generator processes "
        "on CPU 1. The cluster's server CPU is the sum of the three processes, sharing the one core the single "
        'node has to itself, so "server" as bottleneck means CPU 0 (A + B + redis) was full. Per process: '
        "µs of that process's CPU per delivery (a node over the deliveries to its own subscribers, redis over all "
        "deliveries), and in brackets its share of a core. CPU figures come from 10 ms kernel ticks, so short "
        "phases are coarse.",
        "",
    ]
    table = []
    for r in rows:
        L = r.get("latency") or {}
        table.append(
            [
                f"{r['size']:,}",
                r["phase"],
                r["variant"],
                _num(r["offered_deliveries_per_s"]) if r["phase"] == "latency" else "max",
                _num(r["deliveries_per_s"]),
                _num(r["server_us_per_delivery"], "{:.2f}"),
                _proc_us(r, "A"),
                _proc_us(r, "B"),
                _proc_us(r, "redis"),
                fmt_us(L.get("p50")) if L else "",
                fmt_us(L.get("p99")) if L else "",
                *capacity(r),
                _check(r),
            ]
        )
    out += markdown_table(
        [
            "room",
            "phase",
            "mode",
            "offered del/s",
            "deliveries/s",
            "server µs/del (all)",
            "node A µs/del",
            "node B µs/del",
            "redis µs/del",
            "p50",
            "p99",
            *CAPACITY_COLUMNS,
            "check",
        ],
        table,
    )
    ratios = []
    for c in (r for r in rows if r["variant"] == "cluster"):
        one = next(
            (
                b
                for b in rows
                if b["variant"] == "single" and b["size"] == c["size"] and b["phase"] == c["phase"]
            ),
            None,
        )
        if one is None:
            continue
        lc, l1 = c.get("latency") or {}, one.get("latency") or {}
        ratios.append(
            [
                f"{c['size']:,}",
                c["phase"],
                _ratio(c["deliveries_per_s"], one["deliveries_per_s"]),
                _ratio(c["server_us_per_delivery"], one["server_us_per_delivery"]),
                _ratio(lc.get("p50"), l1.get("p50")) if lc else "",
                _ratio(lc.get("p99"), l1.get("p99")) if lc else "",
                f"{c['interval']['bottleneck']} / {one['interval']['bottleneck']}",
            ]
        )
    if ratios:
        out += [
            "",
            "**Redis overhead, cluster ÷ single node (same run):** above 1 = the cluster costs more (CPU, latency) "
            "or, for deliveries/s, delivers more. At a fixed offered load deliveries/s is the offered rate for both.",
            "",
        ]
        out += markdown_table(
            [
                "room",
                "phase",
                "deliveries/s",
                "server CPU per delivery (A+B+redis ÷ single)",
                "p50",
                "p99",
                "bottleneck cluster / single",
            ],
            ratios,
        )
    return out + [""]


def rooms_section(doc: dict[str, Any]) -> list[str]:
    data, s = doc["data"], doc["settings"]
    out = ["## Rooms that come and go: memory after their TTL, join/leave churn", ""]
    memories = [m for m in (data.get("memory"), data.get("memory_malloc")) if m]
    if memories:
        mib = 2**20
        m = memories[0]
        out += [
            f"{m['rooms']:,} one-shot rooms (join, one publish, leave) on one node with `--history-ttl "
            f"{s['history_ttl']:g}`, after a warm-up of {s['warmup_rooms']:,} rooms that expired first "
            "(bench/scenarios/rooms.py). RSS **cold** (connections open, no room yet: the baseline of the "
            "check), warm (after the warm-up's rooms expired: shows growth from burst to burst), at the peak "
            "and once the TTL passed; the check (issue 14): back within 10 % of **cold**. Once with CPython's "
            "default allocator (pymalloc), the one checked, once with `PYTHONMALLOC=malloc`, reported beside it "
            "(server/heap.py: what pins memory in each).",
            "",
        ]
        out += markdown_table(
            ["allocator", "rooms/s", "µs CPU/room", "cold MiB", "warm MiB", "peak MiB", "bytes/room at peak",
             "after MiB", "after ÷ cold", "within 10 % of cold", "after ÷ warm", "settled in"],
            [[m.get("allocator", "pymalloc"), _num(m["rooms_per_s"]), _num(m["server_us_per_room"], "{:.1f}"),
              f"{m['rss_cold'] / mib:.1f}", f"{m['rss_warm'] / mib:.1f}", f"{m['rss_peak'] / mib:.1f}",
              _num(m["bytes_per_room_at_peak"]), f"{m['rss_after'] / mib:.1f}", f"**{m['after_over_cold']:.2f}**",
              ("yes" if m["within_10pct_of_cold"] else "**no**")
              + ("" if m.get("allocator", "pymalloc") == "pymalloc" else " (not checked)"),
              f"{m['after_over_warm']:.2f}",
              f"{m['settled_after_s']:.0f} s"] for m in memories],
        )  # fmt: skip
        out.append("")
    churn = data.get("churn") or []
    if churn:
        out += [
            f"Join/leave churn: {s['churners']} connections join and leave one room in a closed loop for "
            f"{s['churn_duration']:g} s while {s['churn_listeners']} listeners stay in it; presence off (default "
            "namespace) vs on (`--presence --join-leave`: every join and leave is announced to everyone in the "
            "room, so the extra CPU is mostly those events' fan-out).",
            "",
        ]
        rows = [
            [("on" if r["presence"] else "off"), _num(r["joins_per_s"]), _num(r["server_us_per_join"], "{:.1f}"),
             _num(r["events_per_s"]), f"{(r['server_util'] or 0) * 100:.0f}%"]
            for r in churn
        ]  # fmt: skip
        ratios = data.get("ratios") or {}
        if ratios:
            rows.append(
                ["on ÷ off", f"{ratios['joins_per_s_on_over_off']:.2f}",
                 f"{ratios['cpu_per_join_on_over_off']:.2f}", "", ""]
            )  # fmt: skip
        out += markdown_table(
            ["presence", "joins/s", "µs CPU per join+leave", "events/s", "server core"], rows
        )
        out.append("")
    return out


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "fanout": fanout_section,
    "echo": echo_section,
    "heartbeat": heartbeat_section,
    "storm": storm_section,
    "connect": connect_section,
    "cluster": cluster_section,
    "compression": compression.section,
    "rooms": rooms_section,
}


# ---------------------------------------------------------------- headline


def headline(docs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The few figures a README shows: ours, and each as a ratio to every baseline."""
    lines: list[list[str]] = []

    def add(what: str, value: str, ours: float | None, base: dict[str, float | None]) -> None:
        lines.append([what, value, ratio_text(ours, base)])

    if "fanout" in docs:
        rows = docs["fanout"]["data"]["rows"]
        size = 1000 if any(r["size"] == 1000 for r in rows) else max((r["size"] for r in rows), default=0)
        for phase, metric, what, fmt in (
            (
                "throughput",
                "server_us_per_delivery",
                f"server CPU per delivery, room of {size:,}",
                "{:.2f} µs",
            ),
            ("throughput", "deliveries_per_s", f"deliveries/s, room of {size:,} (closed loop)", "{:,.0f}"),
            ("latency", "latency.p99", f"delivery latency p99, room of {size:,}, fixed load", None),
        ):
            ours = next(
                (r for r in rows if r["variant"] == "wsfan" and r["size"] == size and r["phase"] == phase),
                None,
            )
            if ours is None:
                continue
            v = _get(ours, metric)
            same = lambda b, phase=phase: b["size"] == size and b["phase"] == phase  # noqa: E731
            add(what, fmt.format(v) if fmt else fmt_us(v), v, _baselines(rows, same, metric))
    if "echo" in docs:
        rows = docs["echo"]["data"]["rows"]
        loads = [r["load"] for r in rows if r["variant"] == "wsfan" and r["load"] != "max"]
        load = loads[len(loads) // 2] if loads else None
        ours = next((r for r in rows if r["variant"] == "wsfan" and r["load"] == load), None)
        if ours is not None:
            v = ours["latency"].get("p99")
            add(
                f"echo RTT p99 at {load}",
                fmt_us(v),
                v,
                _baselines(rows, lambda b: b["load"] == load, "latency.p99"),
            )
    if "heartbeat" in docs:
        rows = docs["heartbeat"]["data"]["rows"]
        ours = [r for r in rows if r["variant"] == "wsfan" and r["heartbeat_ms"] == 30000]
        ours = ours or [r for r in rows if r["variant"] == "wsfan"]
        if ours:
            r = max(
                (
                    x
                    for x in ours
                    if any(b["connections"] == x["connections"] and b["variant"] != "wsfan" for b in rows)
                ),
                key=lambda x: x["connections"],
                default=ours[0],
            )
            same = lambda b: b["connections"] == r["connections"] and b["heartbeat_ms"] == r["heartbeat_ms"]  # noqa: E731
            add(
                f"memory per idle connection ({r['connections']:,} conns)",
                f"{r['bytes_per_connection'] / 1024:.1f} KB",
                r["bytes_per_connection"],
                _baselines(rows, same, "bytes_per_connection"),
            )
    if "connect" in docs:
        rows = docs["connect"]["data"]["rows"]
        ours = [r for r in rows if r["variant"] == "wsfan" and r["phase"] == "reconnect"]
        r = max(ours, key=lambda x: x["size"], default=None)
        if r is not None:
            same = lambda b, r=r: b["size"] == r["size"] and b["phase"] == r["phase"]  # noqa: E731
            for metric, what, fmt in (
                ("server_us_per_connect", "server CPU per connect + join", "{:,.0f} µs"),
                ("connects_per_s", "connects/s", "{:,.0f}"),
                ("t100_s", "all rejoined after", "{:.2f} s"),
                ("kb_per_connection", "memory per idle connection", "{:.2f} KB"),
            ):
                v = r.get(metric)
                add(
                    f"{what}, reconnection storm of {r['size']:,}",
                    "—" if v is None else fmt.format(v),
                    v,
                    _baselines(rows, same, metric),
                )
    if "storm" in docs:
        for r in docs["storm"]["data"]["results"]:
            if r["event"] == "restart" and r["jitter"] and not r["admission"]:
                c, m = r["crowd"], r["messages"]
                t = [("—" if c[k] is None else f"{c[k]:.1f} s") for k in ("t99_s", "t100_s")]
                lines.append(
                    [
                        f"server restart, {c['clients']:,} clients: 99 % / 100 % reconnected and rejoined",
                        f"{t[0]} / {t[1]}",
                        f"client/ behaviour, no baseline; {m['lost']:,} of {m['published_while_away']:,} "
                        "messages published meanwhile lost",
                    ]
                )
    return lines


# ---------------------------------------------------------------- folder


def load_folder(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    machine = json.loads((folder / "machine.json").read_text()) if (folder / "machine.json").exists() else {}
    docs = {}
    for name in ORDER:
        path = folder / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    return machine, docs


def render_folder(folder: Path) -> Path:
    """Write ``report.md`` and the PNGs for the JSON files in ``folder``; returns the markdown path."""
    machine, docs = load_folder(folder)
    for name, doc in docs.items():
        for plot in PLOTS.get(name, ()):
            plot(doc["data"], folder)
    md = folder / "report.md"
    md.write_text(markdown(machine, docs))
    return md


def markdown(machine: dict[str, Any], docs: dict[str, dict[str, Any]]) -> str:
    quick = any(d.get("quick") for d in docs.values())
    when = max((d["finished_at"] for d in docs.values()), default="?")
    total = sum(d.get("seconds", 0) for d in docs.values())
    out = [
        f"# Benchmarks — {when}{' (quick mode: CI smoke test, figures indicative only)' if quick else ''}",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('logical_cpus', '?')} CPUs "
        f"({machine.get('hypervisor') or '?'}), {machine.get('memory_total_mb', 0) // 1024} GiB, kernel "
        f"{machine.get('kernel', '?')}; Python {machine.get('python', '?')}, "
        + ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items())
        + f"; {machine.get('bun', '')}; git {str(machine.get('git_commit'))[:10]}"
        + (" + uncommitted changes" if machine.get("git_dirty") else "")
        + ".",
        "Every server is pinned to CPU 0, every load generator to CPU 1 (`taskset`); CPU is utime + stime of the "
        "whole process tree. " + f"Total run time {total / 60:.1f} min.",
        "",
        "Load average (1/5/15 min) before → after each scenario, to judge how quiet the machine was: "
        + "; ".join(f"{n} {d['loadavg_before']} → {d['loadavg_after']}" for n, d in docs.items())
        + ". A load near 1.0 with our own processes busy is expected; more means other work shared the cores, "
        'which the "(+others)" core figures show per measurement.',
        "",
        "**How to read the ratios:** ratio = our figure ÷ the baseline's figure, both measured in this run. For CPU, "
        "latency, memory and time, below 1 is better; for rates (deliveries/s, handshakes/s), above 1 is better. "
        "Baselines: **naive picows** (one `send()` per subscriber, bench/baselines/naive_picows.py), **websockets lib** "
        "(idiomatic `broadcast()` on the `websockets` library, bench/baselines/websockets_server.py), **Bun** "
        "(`Bun.serve` with `ws.publish`, bench/baselines/bun_server.js). Bottleneck: the side whose core was ≥ 90 % "
        'busy with our process; "(shared core)" when it was full only with other processes\' help.',
        "",
        "## Headline",
        "",
    ]
    out += markdown_table(["figure", "wsfan", "÷ baseline (same run)"], headline(docs))
    out.append("")
    for name in ORDER:
        if name in docs:
            out += SECTIONS[name](docs[name])
    notes = []
    for name, doc in docs.items():
        for key, why in (doc.get("skipped") or {}).items():
            notes.append(f"- {name}: {_label(key)} skipped — {why}")
        for f in doc["data"].get("failures", []):
            notes.append(f"- {name}: CHECK FAILED — {f}")
    if notes:
        out += ["## Notes", "", *dict.fromkeys(notes), ""]
    return "\n".join(out) + "\n"
