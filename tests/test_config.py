"""One settings object from defaults, TOML, environment and flags, in that order of precedence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.ports import free_port
from helpers.servers import ROOT, ServerProcess
from wsfan.server import config
from wsfan.server import namespaces as ns_config


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


# ---- every config surface refuses a bad value in wsfan's words: where, the value, what is allowed


def _bad_of_kind(kind: str, surface: str) -> object | None:
    """A value that is not of ``kind`` on ``surface`` (None when that surface cannot carry one)."""
    if kind == "str":
        return 1 if surface == "toml" else None  # flags and variables are text
    if kind == "bool":
        return "maybe" if surface != "flag" else None  # --presence / --no-presence take no value
    return "abc"


def _breaks_rule(name: str) -> object:
    ok = config.RULES[name][0]
    for candidate in (-1, 0, 0.5, 51, 301, 1023, 70000, "loud"):
        try:
            if isinstance(candidate, str) != (config.Settings.__annotations__[name] == "str"):
                continue
            if not ok(candidate):
                return candidate
        except TypeError:
            continue
    raise AssertionError(f"no value breaks the rule of {name}")


def _refusal(capsys, tmp_path, name: str, surface: str, value: object) -> str:
    argv: list[str] = []
    environ: dict[str, str] = {}
    if surface == "flag":
        argv = ["--" + name.replace("_", "-"), str(value)]
    elif surface == "env":
        environ = {f"WSFAN_{name.upper()}": str(value)}
    else:
        toml = tmp_path / "c.toml"
        toml.write_text(f"{name} = {value!r}\n".replace("'", '"'))
        argv = ["--config", str(toml)]
    with pytest.raises(SystemExit) as exit_:
        config.load(argv, environ=environ)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    for leak in ("`", "$.", "Expected", "invalid int value", "invalid float value"):
        assert leak not in err, err
    return err


LABELS = {"flag": "{flag}: ", "env": "WSFAN_{upper} ({flag}): ", "toml": "{name} in --config "}


KIND_CASES = [
    (name, surface, value)
    for name, kind in config.Settings.__annotations__.items()
    if not kind.startswith("dict")  # namespaces: test_a_bad_namespace_option_is_refused_in_wsfans_words
    for surface in ("flag", "env", "toml")
    if (value := _bad_of_kind(kind, surface)) is not None
]


@pytest.mark.parametrize(("name", "surface", "value"), KIND_CASES)
def test_a_value_not_of_the_settings_kind_is_refused_naming_where_value_and_kind(
    capsys, tmp_path, name, surface, value
):
    err = _refusal(capsys, tmp_path, name, surface, value)
    flag = "--" + name.replace("_", "-")
    assert LABELS[surface].format(flag=flag, upper=name.upper(), name=name) in err, err
    assert f"expected {config.allowed(name)}, got {value!r}" in err, err


@pytest.mark.parametrize("surface", ["flag", "env", "toml"])
@pytest.mark.parametrize("name", list(config.RULES))
def test_a_value_that_breaks_the_settings_rule_is_refused_naming_where_value_and_rule(
    capsys, tmp_path, name, surface
):
    value = _breaks_rule(name)
    err = _refusal(capsys, tmp_path, name, surface, value)
    flag = "--" + name.replace("_", "-")
    assert LABELS[surface].format(flag=flag, upper=name.upper(), name=name) in err, err
    given = value if surface == "toml" else str(value)
    assert f"expected {config.RULES[name][1]}, got {config.shown(name, given)}" in err, err


def test_non_finite_numbers_are_refused(capsys, tmp_path):
    for text in ("nan", "inf", "-inf"):
        assert "expected a number of seconds > 0, got" in _refusal(
            capsys, tmp_path, "history_ttl", "env", text
        )


@pytest.mark.parametrize("surface", ["flag", "env", "toml"])
@pytest.mark.parametrize("option", [*ns_config.OPTIONS, "bogus"])
def test_a_bad_namespace_option_is_refused_in_wsfans_words(capsys, tmp_path, option, surface):
    kind = ns_config.OPTIONS[option][0] if option in ns_config.OPTIONS else "int"
    value = {"int": "abc", "float": "abc", "bool": "maybe"}[kind]
    argv: list[str] = []
    environ: dict[str, str] = {}
    if surface == "flag":
        argv, where = ["--namespaces", f"chat:{option}={value}"], "--namespaces chat: "
    elif surface == "env":
        environ, where = {"WSFAN_NAMESPACES": f"chat:{option}={value}"}, "WSFAN_NAMESPACES chat: "
    else:
        (tmp_path / "c.toml").write_text(f'[namespaces.chat]\n{option} = "{value}"\n')
        argv, where = ["--config", str(tmp_path / "c.toml")], "[namespaces.chat] in --config "
    with pytest.raises(SystemExit) as exit_:
        config.load(argv, environ=environ)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and where in err, err
    if option == "bogus":
        assert "unknown option 'bogus'; the options are history_size, history_ttl" in err, err
    else:
        assert f"{option}: expected {ns_config.OPTIONS[option][2]}, got '{value}'" in err, err
    for leak in ("`", "$.", "Expected", "Object contains"):
        assert leak not in err, err


def test_a_namespace_option_out_of_range_names_the_value(capsys):
    with pytest.raises(SystemExit):
        config.load(["--namespaces", "chat:history_size=-1;news:history_ttl=0"], environ={})
    err = capsys.readouterr().err
    assert "--namespaces chat: history_size: expected a whole number >= 0, got '-1'" in err
    assert "--namespaces news: history_ttl: expected a number of seconds > 0, got '0'" in err


@pytest.mark.parametrize("surface", ["flag", "env", "toml"])
def test_a_jwt_secret_under_256_bits_is_refused_without_quoting_it(capsys, tmp_path, surface):
    """RFC 7518 section 3.2: an HS256 key has at least 256 bits; deploy/production.toml says 32 bytes.
    A shorter --jwt-secret started the server without a word; the refusal gives its length, not it."""
    secret = "short-secret-31-bytes-long-xxxx"
    assert len(secret) == 31
    err = _refusal(capsys, tmp_path, "jwt_secret", surface, secret)
    assert "at least 32 bytes" in err and "RFC 7518" in err and "got 31 bytes" in err, err
    assert secret not in err
    assert config.load(["--jwt-secret", secret + "x"], environ={}).jwt_secret == secret + "x"
    assert config.load(["--jwt-secret", ""], environ={}).jwt_secret == ""


def test_the_token_command_refuses_a_short_secret_too():
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", "token", "--sub", "a", "--secret", "s3cret"],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 2 and "at least 32 bytes" in r.stderr and "s3cret" not in r.stderr, r.stderr
