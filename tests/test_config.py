"""One settings object from defaults, TOML, environment and flags, in that order of precedence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.ports import free_port
from helpers.servers import ROOT, ServerProcess
from wsfan.server import config


def test_help_documents_every_setting_with_its_default():
    out = subprocess.run(
        [sys.executable, "-m", "wsfan", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    flat = " ".join(out.split())
    defaults = config.Settings()
    for name in config.Settings.__annotations__:
        flag = "--" + name.replace("_", "-")
        assert flag in out, flag
        assert f"default: {getattr(defaults, name)!r}" in flat, name
        assert f"WSFAN_{name.upper()}" in flat, name


def test_precedence_defaults_toml_env_cli(tmp_path):
    toml = tmp_path / "wsfan.toml"
    toml.write_text("[server]\nport = 9001\nrate-limit = 5\nhistory_size = 7\necho_endpoint = true\n")
    s = config.load(["--config", str(toml)], environ={})
    assert (s.port, s.rate_limit, s.history_size, s.echo_endpoint) == (9001, 5.0, 7, True)
    s = config.load(["--config", str(toml)], environ={"WSFAN_PORT": "9002", "WSFAN_ECHO_ENDPOINT": "false"})
    assert (s.port, s.echo_endpoint, s.history_size) == (9002, False, 7)
    s = config.load(["--config", str(toml), "--port", "9003"], environ={"WSFAN_PORT": "9002"})
    assert s.port == 9003
    assert config.load([], environ={}) == config.Settings()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], "port"),
        (["--rate-limit", "-1"], "rate-limit"),
        (["--log-level", "loud"], "log-level"),
        (["--heartbeat-timeout", "0"], "heartbeat"),
    ],
)
def test_bad_settings_exit_with_a_clear_message(argv, message):
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", *argv], cwd=ROOT, capture_output=True, text=True, timeout=20
    )
    assert r.returncode == 2
    assert message in r.stderr


def test_unknown_toml_key_is_refused(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", "--config", str(toml)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and "prot" in r.stderr


def test_server_listens_where_the_toml_file_says(tmp_path):
    port = free_port()
    toml = tmp_path / "wsfan.toml"
    toml.write_text(f'host = "127.0.0.1"\nport = {port}\n')
    srv = ServerProcess("--config", str(toml), port=port)
    srv.args = ["--config", str(toml)]
    srv.start()
    try:
        assert srv.alive()
    finally:
        assert srv.stop() == 0
