"""Instructions (callgrind) or CPU time per connect + join of one server, with the C crowd (issue 19).

``python -m wsfan.bench.tools.callgrind_connect [--server wsfan|naive] [--clients 300] [--rounds 3]``

The server runs pinned to ``--server-cpu`` (under ``valgrind --tool=callgrind`` unless
``--cpu-time``); ``bench/tools/connect_client.c`` (built here with ``cc -O2``) runs pinned to
``--client-cpu`` and, per round, opens ``--clients`` connections with ``--in-flight`` handshakes
at once, each waiting for the welcome, joining room ``r<i % rooms>`` and waiting for the ack
(*connect*), then closes them all with a close handshake (*close*; ``--close drop``: every socket
closed at once without a close frame, as the connect bench's reconnect wave). The server is left to go
quiet after each phase (its CPU over 0.3 s under 3 % of a core), then the phase is read:

- callgrind: ``callgrind_control --dump`` ends each phase; a dump's total instructions ÷ clients
  is the phase's instructions per connection (user space; a loaded machine does not change the
  code's share, but it stretches the phases, and the timer-driven tasks, mostly the heartbeat
  sweep over every open connection each second, then hold more: reported apart, with the
  collector's share, as "without timer-driven tasks"; ``--in-flight 1`` also takes batching
  out, the variable part left, so that one change's few thousand instructions show);
- ``--cpu-time``: the server's on-CPU time over the phase from ``/proc/<pid>/task/*/schedstat``
  (user + kernel, the kernel's loopback TCP share in the server's context included) ÷ clients.

The first round warms up (tables grown, code paths specialised) and is left out of the median.
Prints one line per phase and round and the medians; ``--json`` writes them too. The dumps stay
in ``--out`` for ``callgrind_annotate``. Which server: ``wsfan`` (``python -m wsfan``, rate
limit off, warnings only, as the connect bench starts it) or ``naive`` (the naive picows server,
bench/baselines/naive_picows.py: the floor of picows on uvloop); ``--ref REF`` runs wsfan as at
commit ``REF`` (exported by ``bench/baselines/commit.py``, this venv's libraries), so a before and
an after are measured by the same tool; ``--`` passes more arguments to the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wsfan.bench.baselines.commit import resolve, tree
from wsfan.bench.harness import end_tree, spawn

HERE = Path(__file__).resolve().parent
CLIENT_SOURCE = HERE / "connect_client.c"
QUIET_STEP_S = 0.3
QUIET_SHARE = 0.03  # of one core
QUIET_LIMIT_S = 120.0


def build_client(folder: Path) -> Path:
    """Compile the C crowd into ``folder``; raises ``subprocess.CalledProcessError`` if cc fails."""
    binary = folder / "connect_client"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(CLIENT_SOURCE)], check=True)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: ``python -c`` for a module run with the cyclic collector off (``-c`` puts the working directory
#: first on sys.path, as ``-m`` does).
GC_OFF = (
    "import gc, runpy, sys; gc.disable(); module = sys.argv.pop(1); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def server_argv(kind: str, port: int, extra: list[str], gc_off: bool = False) -> list[str]:
    """The server's command line (run in the folder ``tree(ref)`` gives for wsfan at another commit)."""
    if kind == "wsfan":
        module, args = "wsfan", ["--host", "127.0.0.1", "--port", str(port), "--rate-limit", "0"]
        args += ["--log-level", "warning"]
    elif kind == "naive":
        module, args = "wsfan.bench.baselines.naive_picows", ["--port", str(port)]
    else:
        raise ValueError(f"unknown server {kind!r}")
    if gc_off:
        return [sys.executable, "-c", GC_OFF, module, *args, *extra]
    return [sys.executable, "-m", module, *args, *extra]


def cpu_ticks(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def on_cpu_ns(pid: int) -> int:
    """Nanoseconds every thread of ``pid`` spent on a CPU (schedstat's first field, user + kernel)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def wait_quiet(pid: int) -> None:
    """Until the server's CPU over ``QUIET_STEP_S`` is under ``QUIET_SHARE`` of a core (at most ``QUIET_LIMIT_S``)."""
    deadline = time.monotonic() + QUIET_LIMIT_S
    last = cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(QUIET_STEP_S)
        now = cpu_ticks(pid)
        if now - last < QUIET_SHARE * QUIET_STEP_S:
            return
        last = now
    raise SystemExit(f"server {pid} not quiet after {QUIET_LIMIT_S:g} s")


def wait_listening(port: int, proc: subprocess.Popen[bytes], limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server not listening on {port} after {limit:g} s")


def dump_total(path: Path) -> int:
    """Total instructions in one callgrind dump (its ``summary:`` or ``totals:`` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


#: Functions whose inclusive cost is reported apart (callgrind_annotate names): the cyclic collector,
#: and asyncio task steps, which on this path are only timer-driven background (the registry's
#: heartbeat sweep over every open connection each second, the broker's sweeper): how much of them a
#: phase holds depends on how long it took, not on the connections it served.
APART = {"gc": "gcmodule.c:gc_collect_main", "tasks": "_asynciomodule.c:task_wakeup"}


def dump_apart(path: Path) -> dict[str, int]:
    """Inclusive instructions of each ``APART`` function in one dump (0 if absent); {} without callgrind_annotate."""
    if shutil.which("callgrind_annotate") is None:
        return {}
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
    ).stdout
    found = dict.fromkeys(APART, 0)
    for line in out.splitlines():
        fields = line.split()
        for key, name in APART.items():
            if not found[key] and fields and any(f.endswith(name) for f in fields[1:4]):
                found[key] = int(fields[0].replace(",", ""))
    return found


class Crowd:
    def __init__(self, binary: Path, port: int, args: argparse.Namespace) -> None:
        argv = [str(binary), "127.0.0.1", str(port), str(args.clients), str(args.in_flight)]
        argv += [str(args.rooms), args.path]
        if args.client_cpu >= 0:
            argv = ["taskset", "-c", str(args.client_cpu), *argv]
        self.proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"connect_client failed on {cmd!r} (exit code {self.proc.wait()})")
        return line.strip()

    def quit(self) -> None:
        try:
            self.ask("quit")
        except (SystemExit, BrokenPipeError):
            pass
        end_tree(self.proc, None, 10.0)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out or tempfile.mkdtemp(prefix="callgrind-connect-"))
    out.mkdir(parents=True, exist_ok=True)
    binary = build_client(out)
    port = free_port()
    argv = server_argv(args.server, port, args.server_args, args.gc_off)
    # ``python -m`` imports from its working directory first: the commit's tree, not this checkout
    cwd = tree(args.ref)[0] if args.ref and args.server == "wsfan" else None
    if not args.cpu_time:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out.%p", *argv]
    if args.server_cpu >= 0:
        argv = ["taskset", "-c", str(args.server_cpu), *argv]
    server = spawn(argv, cwd=cwd, stderr=subprocess.DEVNULL if not args.verbose else None)
    phases: dict[str, list[float]] = {"connect": [], "close": []}
    extra: dict[str, list[float]] = {}  # callgrind: per phase, the APART shares and the total without tasks
    try:
        wait_listening(port, server)
        wait_quiet(server.pid)
        crowd = Crowd(binary, port, args)
        try:
            if not args.cpu_time:
                subprocess.run(
                    ["callgrind_control", "--zero", str(server.pid)], check=True, capture_output=True
                )
            for r in range(args.rounds):
                for phase, cmd in (("connect", "connect"), ("close", args.close)):
                    before = on_cpu_ns(server.pid)
                    reply = crowd.ask(cmd)
                    wait_quiet(server.pid)
                    if args.cpu_time:
                        value = (on_cpu_ns(server.pid) - before) / 1e3 / args.clients
                        unit = "µs"
                    else:
                        seen = set(out.glob(f"callgrind.out.{server.pid}.*"))
                        subprocess.run(
                            ["callgrind_control", f"--dump={phase}-{r}", str(server.pid)],
                            check=True,
                            capture_output=True,
                        )
                        new = sorted(set(out.glob(f"callgrind.out.{server.pid}.*")) - seen)
                        if len(new) != 1:
                            raise SystemExit(f"expected one new dump, found {new}")
                        value = dump_total(new[0]) / args.clients
                        unit = "instructions"
                        apart = {k: v / args.clients for k, v in dump_apart(new[0]).items()}
                        for k, v in apart.items():
                            extra.setdefault(f"{phase}_{k}", []).append(v)
                        if apart:
                            net = value - apart["tasks"]
                            extra.setdefault(f"{phase}_net", []).append(net)
                            reply += f"; without timer-driven tasks {net:,.0f}, of which collector {apart['gc']:,.0f}"
                    phases[phase].append(value)
                    print(f"round {r} {phase:<7} {value:>12,.1f} {unit} per connection ({reply})", flush=True)
        finally:
            crowd.quit()
    finally:
        end_tree(server, None, 60.0)  # valgrind may take a while to write its last dump
    kept = {k: v[1:] if len(v) > 1 else v for k, v in {**phases, **extra}.items()}
    result = {
        "server": args.server,
        "ref": resolve(args.ref) if args.ref else None,
        "server_args": args.server_args,
        "gc_off": args.gc_off,
        "unit": "µs on CPU" if args.cpu_time else "instructions",
        "clients": args.clients,
        "in_flight": args.in_flight,
        "close": args.close,
        "rounds": {**phases, **extra},
        "median": {k: statistics.median(v) for k, v in kept.items()},
        "dumps": str(out),
    }
    med = result["median"]
    print(
        f"median of rounds 2..{args.rounds}: connect + join {med['connect']:,.0f}, "
        f"close {med['close']:,.0f} {result['unit']} per connection; dumps in {out}"
    )
    if "connect_net" in med:
        print(
            f"  without timer-driven tasks: connect + join {med['connect_net']:,.0f} (collector "
            f"{med['connect_gc']:,.0f}), close {med['close_net']:,.0f} (collector {med['close_gc']:,.0f})"
        )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", choices=("wsfan", "naive"), default="wsfan")
    p.add_argument("--ref", default="", help="wsfan as at this git commit (default: this checkout)")
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--in-flight", type=int, default=50)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--path", default="/ws")
    p.add_argument(
        "--close",
        choices=("close", "drop"),
        default="close",
        help="how the crowd leaves: a close handshake (default) or every socket closed at once, no close "
        "frame (as after a network blip: the reconnect storm's cleanup)",
    )
    p.add_argument("--server-cpu", type=int, default=0, help="-1: unpinned")
    p.add_argument("--client-cpu", type=int, default=1, help="-1: unpinned")
    p.add_argument("--cpu-time", action="store_true", help="no valgrind: server CPU time per connection")
    p.add_argument(
        "--gc-off",
        action="store_true",
        help="the server with the cyclic collector off: the code's own cost, without the collections "
        "(whose timing moves a few K instructions between rounds); the difference is the collector's share",
    )
    p.add_argument("--out", help="folder for the client binary and the dumps (default: a new temp folder)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--verbose", action="store_true", help="show the server's (and valgrind's) stderr")
    p.add_argument("server_args", nargs="*", help="after --: more arguments for the server")
    args = p.parse_args()
    if shutil.which("cc") is None or (not args.cpu_time and shutil.which("valgrind") is None):
        raise SystemExit("needs cc, and valgrind unless --cpu-time (apt-get install gcc valgrind)")
    result = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
