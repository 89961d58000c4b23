"""Startup problems an operator can fix: one line that says what to do, exit code 2, no traceback.

Every case runs the real command (``python -m wsfan``), as an operator would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from helpers.ports import free_port
from helpers.servers import ROOT
from wsfan import __version__


def run_wsfan(*argv: str, code: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "wsfan", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_usage_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert lines[0].startswith("wsfan: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_port_in_use(taken_port):
    r = run_wsfan("--host", "127.0.0.1", "--port", str(taken_port))
    assert_one_line_usage_error(r, f"127.0.0.1:{taken_port} is already in use", "--port")


def test_http_port_in_use(taken_port):
    r = run_wsfan("--host", "127.0.0.1", "--port", str(free_port()), "--http-port", str(taken_port))
    assert_one_line_usage_error(r, "already in use", "--http-port")


def test_port_in_use_with_workers_fails_before_forking(taken_port):
    # SO_REUSEPORT would let workers share a port with another process of the same user: refused up front.
    r = run_wsfan("--port", str(taken_port), "--workers", "2", "--broker", "redis://127.0.0.1:1/0")
    assert_one_line_usage_error(r, "already in use")


@pytest.mark.parametrize(
    "url, needle",
    [
        ("redis://127.0.0.1:notaport/0", "Port could not be cast"),
        ("redis://:s3cret@127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("http://127.0.0.1:6379", "broker must be a redis:// URL"),
    ],
)
def test_bad_broker_url(url, needle):
    r = run_wsfan("--port", str(free_port()), "--broker", url)
    assert_one_line_usage_error(r, needle)
    assert "s3cret" not in r.stderr


def test_missing_redis_extra_says_how_to_install_it():
    # The installed command, with redis-py made unimportable as on a plain `pip install wsfan`.
    code = "import sys; sys.modules['redis'] = None; from wsfan.__main__ import main; sys.exit(main())"
    r = run_wsfan("--port", str(free_port()), "--broker", "redis://127.0.0.1:6379/0", code=code)
    assert_one_line_usage_error(r, "pip install 'wsfan[redis]'")


def test_unreadable_or_invalid_config(tmp_path):
    r = run_wsfan("--config", str(tmp_path / "missing.toml"))
    assert_one_line_usage_error(r, "missing.toml", "cannot read it")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1\n")
    assert_one_line_usage_error(run_wsfan("--config", str(bad)), "not valid TOML")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.toml"
        locked.write_text("port = 9000\n")
        locked.chmod(0)
        assert_one_line_usage_error(run_wsfan("--config", str(locked)), "Permission denied")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--port", "abc"], "--port"),
        (["--workers", "0"], "workers"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--host", "no.such.host.invalid"], "--host"),
    ],
)
def test_bad_flag_value(argv, needle):
    assert_one_line_usage_error(run_wsfan(*argv), needle)


def test_version():
    r = run_wsfan("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"wsfan {__version__}"


def test_production_without_broker_runs_one_worker_instead_of_failing(make_server):
    # Before: on a machine with 2+ cores this failed with "--workers > 1 needs --broker", a flag never given.
    srv = make_server("--production", "--allow-anonymous", "--log-format", "text").start()
    try:
        assert srv.alive()
    finally:
        assert srv.stop() == 0
    out = srv.output()
    assert "needs --broker" not in out
    assert "supervisor" not in out  # one process: no supervisor
    if (os.cpu_count() or 1) > 1:
        assert "without --broker runs one worker" in out


def test_production_with_broker_runs_a_worker_per_core(make_server):
    # Redis need not be up: the node starts without it and keeps retrying.
    srv = make_server(
        "--production",
        "--allow-anonymous",
        "--log-format",
        "text",
        "--broker",
        f"redis://127.0.0.1:{free_port()}/0",
    ).start()
    try:
        assert srv.alive()
    finally:
        assert srv.stop() == 0
    cores = os.cpu_count() or 1
    out = srv.output()
    if cores > 1:
        assert f"{cores} workers" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("env", "toml", "needle"),
    [
        ({"WSFAN_PORT": "abc"}, None, "WSFAN_PORT"),
        ({"WSFAN_HEARTBEAT": "soon"}, None, "--heartbeat"),
        ({}, 'rate_limit = "fast"\n', "rate_limit in --config"),
    ],
)
def test_bad_env_or_config_value_names_the_setting_not_the_validator(tmp_path, env, toml, needle):
    """One line in the words of the flag, the variable and the TOML key, never msgspec's ``$.port`` path."""
    argv = []
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
        argv = ["--config", str(tmp_path / "c.toml")]
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, **env},
    )
    assert_one_line_usage_error(r, needle, "expected")
    assert "$." not in r.stderr and "`" not in r.stderr


def test_an_app_module_that_raises_at_import_is_one_line_and_its_own_traceback(tmp_path):
    """docs/app-api.md: exit 2, one line naming the exception, then the traceback of the
    application's frames only (was: exit 1 and a traceback through wsfan and importlib)."""
    (tmp_path / "badapp.py").write_text(
        'import wsfan\n\n\ndef boom():\n    raise RuntimeError("x")\n\n\nboom()\n'
    )
    for spec in ("badapp:app", "badapp.py:app"):
        r = subprocess.run(
            [sys.executable, "-m", "wsfan", "run", spec],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert r.returncode == 2, (r.returncode, r.stderr)
        first, *rest = r.stderr.splitlines()
        assert first.startswith(f"wsfan: error: --app '{spec}': importing ")
        assert "raised RuntimeError: x" in first
        trace = "\n".join(rest)
        assert 'badapp.py", line 8, in <module>' in trace and "line 5, in boom" in trace
        assert rest[-1] == "RuntimeError: x"
        assert "importlib" not in trace and "application.py" not in trace and "wsfan" not in trace, trace
    full = subprocess.run(
        [sys.executable, "-m", "wsfan", "run", "badapp:app", "--log-level", "debug"],
        cwd=tmp_path, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert full.returncode == 2 and "importlib" in full.stderr and "application.py" in full.stderr


def test_an_app_module_whose_import_is_missing_is_its_own_error_not_the_specs(tmp_path):
    (tmp_path / "depapp.py").write_text("import no_such_dependency_xyz\n")
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", "run", "depapp:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 2
    assert (
        "importing 'depapp' raised ModuleNotFoundError: No module named 'no_such_dependency_xyz'" in r.stderr
    )
    assert 'depapp.py", line 1' in r.stderr


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("okapp:nope", "'okapp' has no attribute 'nope'"),
        ("okapp:app.nope", "'okapp:app' has no attribute 'nope'"),
        ("okapp:x", "'x' in 'okapp' is not a wsfan.App (it is of type int)"),
        ("no_such_app_module:app", "no module named 'no_such_app_module'"),
        ("no_such_file.py:app", "no such file 'no_such_file.py'"),
    ],
)
def test_an_app_spec_that_names_nothing_says_so_in_one_line(tmp_path, spec, needle):
    (tmp_path / "okapp.py").write_text("import wsfan\n\napp = wsfan.App()\nx = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", "run", spec], cwd=tmp_path, capture_output=True, text=True, timeout=20
    )
    assert_one_line_usage_error(r, needle)
