"""The benchmark harness leaves no process behind (bench/harness.py: ``spawn``, ``end_tree``).

Real processes: a "server" that starts a child and never listens, and a real benchmark run
stopped by its timeout. Before, a start that timed out SIGTERMed the server alone (its child
lived on), and a timed-out run was SIGKILLed alone (its servers and load generators lived on).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_bench import _bench

from helpers.ports import free_port
from wsfan.bench.harness import BenchError, ServerProcess

# A server that never listens: it starts a child of its own (as a supervisor starts its workers),
# writes the child's pid, and sleeps.
STUCK = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def alive(p: psutil.Process) -> bool:
    """Running and the same process (psutil checks the pid was not reused); a zombie is gone."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def gone_within(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_a_server_start_that_times_out_leaves_no_child_alive(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    srv = ServerProcess("stuck", [sys.executable, "-c", STUCK, str(pidfile)], free_port(), cpu=None)
    with pytest.raises(BenchError, match="did not accept connections"):
        srv.start(ready_timeout=3.0)
    child = psutil.Process(int(pidfile.read_text()))
    try:
        assert not alive(srv.proc), "the server itself is stopped"  # type: ignore[arg-type]
        assert not gone_within([child], 5.0), "the server's child outlived the failed start"
    finally:
        if alive(child):
            child.kill()  # ours (the old harness left it): do not leave it to the next test


def test_a_timed_out_benchmark_run_leaves_no_process_behind(tmp_path: Path) -> None:
    """``fanout --smoke`` stopped by a 6 s timeout mid-run: every process it started (server,
    load generators) is gone after, the run ends with ``TimeoutExpired``."""
    seen: dict[int, psutil.Process] = {}
    done = threading.Event()

    def watch() -> None:  # every descendant of this test process while the run lasts
        me = psutil.Process()
        while not done.is_set():
            try:
                for p in me.children(recursive=True):
                    seen.setdefault(p.pid, p)
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _bench("fanout", "--smoke", "--out", str(tmp_path), timeout=6.0)
    finally:
        done.set()
        watcher.join()
        left = gone_within(list(seen.values()), 5.0)
        for p in left:
            p.kill()  # the old harness's leftovers: ours, not the next test's
    assert len(seen) >= 3, "the run did not get as far as its server and load generators"
    assert not left, f"{len(left)} process(es) outlived the run: {[p.pid for p in left]}"
