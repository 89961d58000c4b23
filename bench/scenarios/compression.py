"""Compression: what permessage-deflate costs and saves in a room of 1,000, against Bun's in the same run.

Four servers, each with the fan-out scenario's two phases (closed-loop throughput, open-loop
latency at a fixed load) in one room of ``--sizes`` subscribers, all offering
permessage-deflate as browsers do: wsfan (which ignores the offer), ``wsfan --compression``
(one compressed frame per publication, shared), Bun, and Bun with ``perMessageDeflate`` and
``ws.publish(..., compress)``. Payloads are chat-like JSON (words, a user, a timestamp) of
``--payload-size`` bytes, not a run of one letter that would compress a hundredfold.

Figures per server: server CPU µs per delivery, **bytes on the wire per delivery** (frame
header + payload as the subscribers received it), deliveries/s, delivery latency. Ratios:
``wsfan --compression`` ÷ wsfan (what compression costs and saves) and ÷ Bun perMessageDeflate.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from wsfan.bench.scenarios import fanout
from wsfan.bench.suite import add_common, csv_ints, csv_words, run_scenario, settings_from

NAME = "compression"
HELP = "permessage-deflate in a room of 1,000: server CPU and bytes on the wire per delivery, vs Bun's"


@dataclass
class Settings(fanout.Settings):
    variants: tuple[str, ...] = ("wsfan", "wsfan-deflate", "bun", "bun-deflate")
    sizes: tuple[int, ...] = (1000,)
    payload_size: int = 400
    compression: bool = True  # subscribers offer permessage-deflate
    chat_payload: bool = True


QUICK: dict[str, Any] = {"sizes": (100,), **fanout.QUICK_PHASES}
SMOKE = fanout.SMOKE  # the quick phases (see fanout.SMOKE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--variants", type=csv_words, help="servers (default wsfan,wsfan-deflate,bun,bun-deflate)")
    p.add_argument("--sizes", type=csv_ints, help="room sizes (default 1000)")
    p.add_argument("--payload-size", type=int, help="approximate JSON payload size in bytes (default 400)")
    fanout.add_phase_arguments(p)


def measure(ctx: Any, s: Settings) -> dict[str, Any]:
    result = fanout.measure(ctx, s)
    for r in result["rows"]:
        if r["deliveries"] and r.get("wire_bytes_per_delivery") is None:
            result["failures"].append(f"compression {r['variant']}: no wire byte count")
    return result


def run(args: argparse.Namespace) -> int:
    return run_scenario(NAME, measure, settings_from(Settings, QUICK, args, SMOKE), args)


def _by(rows: list[dict[str, Any]], variant: str, size: int, phase: str) -> dict[str, Any] | None:
    return next((r for r in rows if (r["variant"], r["size"], r["phase"]) == (variant, size, phase)), None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def section(doc: dict[str, Any]) -> list[str]:
    """The report's "Compression" section: one table per room size, ratios in the same run."""
    rows = doc["data"]["rows"]
    out = [
        "## Compression (permessage-deflate)",
        "",
        "Subscribers offer permessage-deflate (as browsers do); chat-like JSON payloads of "
        f"~{doc['settings'].get('payload_size', 400)} bytes. Bytes on the wire = frame header + payload as received.",
        "",
    ]
    for size in sorted({r["size"] for r in rows}):
        out += [
            f"Room of {size:,}:",
            "",
            "| server | phase | server µs/delivery | bytes on the wire/delivery | deliveries/s | p50 / p99 µs | bottleneck |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["size"] != size:
                continue
            lat = r.get("latency") or {}
            out.append(
                f"| {r['variant']} | {r['phase']} | {r['server_us_per_delivery'] or 0:.2f} | "
                f"{r.get('wire_bytes_per_delivery') or 0:,.0f} | {r['deliveries_per_s'] or 0:,.0f} | "
                + (f"{lat.get('p50', 0):,.0f} / {lat.get('p99', 0):,.0f}" if lat else "–")
                + f" | {r['interval']['bottleneck']} |"
            )
        out.append("")
        for phase in ("throughput", "latency"):
            z, plain, bunz = (_by(rows, v, size, phase) for v in ("wsfan-deflate", "wsfan", "bun-deflate"))
            if z is None:
                continue
            parts = []
            if plain is not None:
                parts.append(
                    f"÷ wsfan uncompressed: CPU {_ratio(z['server_us_per_delivery'], plain['server_us_per_delivery'])}, "
                    f"bytes {_ratio(z['wire_bytes_per_delivery'], plain['wire_bytes_per_delivery'])}"
                )
            if bunz is not None:
                parts.append(
                    f"÷ Bun perMessageDeflate: CPU {_ratio(z['server_us_per_delivery'], bunz['server_us_per_delivery'])}, "
                    f"bytes {_ratio(z['wire_bytes_per_delivery'], bunz['wire_bytes_per_delivery'])}"
                )
            out.append(f"- {phase}: wsfan --compression " + "; ".join(parts))
        out.append("")
    return out
