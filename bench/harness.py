"""Processes, CPU pinning and measurement shared by every benchmark scenario.

A scenario starts one server process pinned to ``SERVER_CPU`` and one or more
load-generator processes (``python -m wsfan.bench.loadgen``) pinned to ``CLIENT_CPU``,
talks to the load generators over a line-based JSON control channel
(stdin/stdout), and brackets the measured phase with ``Meter``: wall time, CPU
time (utime + stime) of the server's whole process tree and of the load
generators, and how busy each core was in total, so that load from unrelated
processes on a shared machine shows up in the results instead of silently in
the figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from wsfan.bench.results import RESULTS, ROOT

SERVER_CPU = 0
CLIENT_CPU = 1

LOGS = RESULTS / "tmp" / "bench"  # process logs of the latest run (results/tmp/ is git-ignored)
# A side whose process tree used at least this fraction of its core is called the bottleneck.
SATURATED = 0.90
# Open-loop phases: a load generator whose sends left more than this late (p99) could not keep its schedule.
LAG_LIMIT_US = 1000.0


class BenchError(RuntimeError):
    """A benchmark could not run as configured (a process died, a phase timed out)."""


# ---------------------------------------------------------------- environment


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by children) toward ``wanted``; return the soft limit.

    The hard limit is raised too where that is allowed (root), because the idle
    connection figures need more descriptors than a default hard limit of 20,000
    on the load-generator side (several servers' connections in one process).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            cap = min(wanted, _nr_open())
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, cap), cap))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _nr_open() -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/fs/nr_open").read_text())
    return 1 << 20


def reset_logs() -> Path:
    """Start a run with an empty log directory, so that it holds exactly the latest run's process logs."""
    if LOGS.exists():
        for f in LOGS.glob("*.log"):
            f.unlink(missing_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    return LOGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` under ``taskset -c cpu`` when pinning is possible; unpinned otherwise."""
    if cpu is None or cpu < 0 or shutil.which("taskset") is None or cpu >= (os.cpu_count() or 1):
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def tree_cpu_times(proc: psutil.Process) -> tuple[float, float]:
    """(utime, stime) of a process and all its live descendants (taskset execs, so the root is Python)."""
    user = system = 0.0
    for p in (proc, *_children(proc)):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            user += t.user
            system += t.system
    return user, system


def tree_cpu_seconds(proc: psutil.Process) -> float:
    return sum(tree_cpu_times(proc))


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in (proc, *_children(proc)):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


# ---------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In a child between fork and exec (``preexec_fn``): on Linux, SIGKILL it when the benchmark
    process dies, even by SIGKILL (a test's timeout); the exec'd program keeps the setting
    (``prctl(2)``: PR_SET_PDEATHSIG survives execve; ``taskset`` execs in place)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` for a benchmark's child (server, load generator, Redis): in a process
    group of its own, so ``end_tree`` can kill all it started (a supervisor's workers), and
    killed with the benchmark process if that dies first (``_die_with_parent``)."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)  # noqa: PLW1509


def end_tree(popen: subprocess.Popen[Any], proc: psutil.Process | None, grace: float) -> int:
    """Stop ``popen`` and everything it started; its exit code.

    SIGTERM first (a server drains and exits 0) and ``grace`` seconds to exit; then SIGKILL to its
    whole process group (``spawn`` made it a group leader; it is not reaped yet, so the group's id
    is still its own). Its descendants, taken before the SIGTERM (``psutil`` refuses a pid that was
    reused meanwhile), are killed too when still alive: one that left the group or was orphaned
    when its parent exited would outlive the run (the leak this replaced: a start that timed out,
    or a run killed by a test's timeout, left servers and workers behind).
    """
    family = _children(proc) if proc is not None else []
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return popen.returncode


class ServerProcess:
    """A server under test: started pinned, ready when its port accepts TCP, stopped with SIGTERM."""

    def __init__(self, name: str, argv: Sequence[str], port: int, cpu: int | None = SERVER_CPU) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.cpu = cpu
        self.popen: subprocess.Popen[bytes] | None = None
        self.proc: psutil.Process | None = None
        self.log_path = LOGS / f"{name}-{port}.log"
        self.exit_code: int | None = None

    def start(self, ready_timeout: float = 20.0) -> ServerProcess:
        """Start it and wait until its port accepts TCP; on any failure (exit, timeout, an exception
        such as Ctrl-C) it and everything it started are stopped (``end_tree``) before raising."""
        LOGS.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.popen = spawn(
                pinned(self.argv, self.cpu),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.proc = psutil.Process(self.popen.pid)
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise BenchError(f"{self.name} exited with {self.popen.returncode}: {self.log_tail()}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
                time.sleep(0.05)
            raise BenchError(
                f"{self.name} did not accept connections on port {self.port} in {ready_timeout}s"
            )
        except BaseException:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        assert self.proc is not None
        return tree_cpu_times(self.proc)

    def rss(self) -> int:
        assert self.proc is not None
        return tree_rss(self.proc)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (the server drains and exits 0); SIGKILL to its whole process group
        after ``timeout``; whatever it started is gone after (``end_tree``)."""
        p = self.popen
        if p is None:
            return None
        self.exit_code = end_tree(p, self.proc, timeout)
        return self.exit_code

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoadGen:
    """One ``python -m wsfan.bench.loadgen`` process, driven by JSON lines on stdin, reporting JSON lines on stdout."""

    def __init__(self, name: str, config: dict[str, Any], cpu: int | None = CLIENT_CPU) -> None:
        self.name = name
        self.config = config
        self.cpu = cpu
        self.popen: subprocess.Popen[str] | None = None
        self.proc: psutil.Process | None = None
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.log_path = LOGS / f"{name}.log"

    def start(self) -> LoadGen:
        LOGS.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "wsfan.bench.loadgen", json.dumps(self.config)]
        with open(self.log_path, "wb") as log:
            self.popen = spawn(
                pinned(argv, self.cpu),
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
        self.proc = psutil.Process(self.popen.pid)
        threading.Thread(target=self._read, name=f"{self.name}-stdout", daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.strip()
            if line:
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    self.events.put({"event": "noise", "line": line})
        self.events.put(None)

    def send(self, **command: Any) -> None:
        assert self.popen is not None and self.popen.stdin is not None
        try:
            self.popen.stdin.write(json.dumps(command) + "\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"{self.name} is gone: {self.log_tail()}") from exc

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for the next report named ``event``; other reports are skipped, errors raise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {event!r} within {timeout:.0f}s; {self.log_tail()}")
            try:
                msg = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise BenchError(f"{self.name} exited before {event!r}: {self.log_tail()}")
            if msg.get("event") == "error":
                raise BenchError(f"{self.name}: {msg.get('message')}")
            if msg.get("event") == event:
                return msg

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return tree_cpu_seconds(self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        """``quit``, then ``timeout`` s to exit; then as ``ServerProcess.stop`` (``end_tree``)."""
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(BenchError):
                self.send(cmd="quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        end_tree(p, self.proc, 5.0)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class LoadGenGroup:
    """Several load generators driven together (``--client-procs``)."""

    def __init__(self, gens: Iterable[LoadGen]) -> None:
        self.gens = list(gens)

    def start(self) -> LoadGenGroup:
        for g in self.gens:
            g.start()
        return self

    def broadcast(self, **command: Any) -> None:
        for g in self.gens:
            g.send(**command)

    def expect_all(self, event: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [g.expect(event, max(0.1, deadline - time.monotonic())) for g in self.gens]

    def cpu_seconds(self) -> float:
        return sum(g.cpu_seconds() for g in self.gens)

    def stop(self) -> None:
        for g in self.gens:
            with contextlib.suppress(BenchError):
                g.send(cmd="quit")
        for g in self.gens:
            g.stop()

    def __enter__(self) -> LoadGenGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- measurement


@dataclass
class Interval:
    """One measured phase. Utilisations are fractions of one core (1.0 = a core fully busy)."""

    wall_s: float
    server_cpu_s: float
    server_user_s: float
    server_system_s: float
    loadgen_cpu_s: float
    server_util: float
    loadgen_util: float
    server_syscalls: dict[str, int] = field(default_factory=dict)
    core_busy: list[float] = field(default_factory=list)
    core_steal: list[float] = field(default_factory=list)
    loadavg_end: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def other_load(self, cpu: int | None, ours: float) -> float | None:
        """Busy time of core ``cpu`` not explained by our process pinned there (other tenants' load)."""
        if cpu is None or cpu >= len(self.core_busy):
            return None
        return max(0.0, self.core_busy[cpu] - ours)

    def bottleneck(self, server_cpu: int | None, client_cpu: int | None) -> str:
        return bottleneck(
            self.server_util,
            self.loadgen_util,
            self.other_load(server_cpu, self.server_util),
            self.other_load(client_cpu, self.loadgen_util),
        )

    def to_dict(self, server_cpu: int | None, client_cpu: int | None) -> dict[str, Any]:
        d = asdict(self)
        d["bottleneck"] = self.bottleneck(server_cpu, client_cpu)
        d["other_load_server_core"] = self.other_load(server_cpu, self.server_util)
        d["other_load_client_core"] = self.other_load(client_cpu, self.loadgen_util)
        return d


def bottleneck(
    server_util: float,
    loadgen_util: float,
    server_other: float | None = None,
    client_other: float | None = None,
) -> str:
    """Which side's core was full. A core full only with other tenants' help is flagged as contended."""

    def side(name: str, ours: float, other: float | None) -> str | None:
        if ours >= SATURATED:
            return name
        if other is not None and ours + other >= SATURATED:
            return f"{name} (shared core)"
        return None

    found = [
        x
        for x in (
            side("server", server_util, server_other),
            side("load generator", loadgen_util, client_other),
        )
        if x
    ]
    if not found:
        return "neither (latency-bound)"
    return " and ".join(found)


def core_times() -> list[tuple[float, float, float]]:
    """Per core: (total, busy, steal) seconds since boot."""
    out = []
    for t in psutil.cpu_times(percpu=True):
        total = sum(t)
        idle = t.idle + getattr(t, "iowait", 0.0)
        out.append((total, total - idle, getattr(t, "steal", 0.0)))
    return out


class Meter:
    """Brackets a phase: CPU of the server tree and of the load generators, wall time, per-core load."""

    def __init__(self, server: ServerProcess, loadgens: LoadGenGroup, count_syscalls: bool = False) -> None:
        self.server = server
        self.loadgens = loadgens
        self._t0 = 0.0
        self._s0 = (0.0, 0.0)
        self._l0 = 0.0
        self._c0: list[tuple[float, float, float]] = []
        self._perf: SyscallCounter | None = SyscallCounter(server.popen.pid) if count_syscalls else None  # type: ignore[union-attr]

    def start(self) -> None:
        self._c0 = core_times()
        if self._perf is not None:
            self._perf.start()
        self._s0 = self.server.cpu_times()
        self._l0 = self.loadgens.cpu_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> Interval:
        wall = time.perf_counter() - self._t0
        user, system = (b - a for a, b in zip(self._s0, self.server.cpu_times(), strict=True))
        s = user + system
        lg = self.loadgens.cpu_seconds() - self._l0
        syscalls = self._perf.stop() if self._perf is not None else {}
        c1 = core_times()
        busy, steal = [], []
        for (t0, b0, st0), (t1, b1, st1) in zip(self._c0, c1, strict=False):
            span = max(t1 - t0, 1e-9)
            busy.append((b1 - b0) / span)
            steal.append((st1 - st0) / span)
        return Interval(
            wall_s=wall,
            server_cpu_s=s,
            server_user_s=user,
            server_system_s=system,
            loadgen_cpu_s=lg,
            server_util=s / wall if wall > 0 else 0.0,
            loadgen_util=lg / wall if wall > 0 else 0.0,
            server_syscalls=syscalls,
            core_busy=busy,
            core_steal=steal,
            loadavg_end=os.getloadavg(),
        )


class SyscallCounter:
    """Counts a process's socket system calls with ``perf stat`` tracepoints (opt-in: it costs a little).

    uvloop writes with ``sendto`` (one buffer) and ``sendmsg`` (several), reads
    with ``recvfrom``, and waits in ``epoll_pwait`` once per loop iteration;
    ``/proc/PID/io`` does not count socket calls, hence perf.
    """

    EVENTS = ("sendmsg", "sendto", "recvfrom", "epoll_pwait", "epoll_wait", "writev", "write")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.popen: subprocess.Popen[str] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("perf") is not None and Path("/sys/kernel/tracing/events/syscalls").exists()

    def start(self) -> None:
        events = ",".join(f"syscalls:sys_enter_{e}" for e in self.EVENTS)
        self.popen = subprocess.Popen(
            ["perf", "stat", "-x,", "-e", events, "-p", str(self.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)  # perf attaches asynchronously

    def stop(self) -> dict[str, int]:
        p = self.popen
        if p is None:
            return {}
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            return {}
        counts: dict[str, int] = {}
        for line in err.splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_") and parts[0].isdigit():
                counts[parts[2].removeprefix("syscalls:sys_enter_")] = int(parts[0])
        return counts


def cores(iv: dict[str, Any]) -> str:
    """'server 45% (+3%) · load gen 80% (+1%)': ours, and (+) other processes on the same core."""

    def pct(x: float | None) -> str:
        return "?" if x is None else f"{x * 100:.0f}%"

    return (
        f"server {pct(iv['server_util'])} (+{pct(iv.get('other_load_server_core'))}) · "
        f"load gen {pct(iv['loadgen_util'])} (+{pct(iv.get('other_load_client_core'))})"
    )
