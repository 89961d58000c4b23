"""The wheel as a new user gets it: one top-level name, no tests, its data files, and a plain install that runs.

The wheel is built from a copy of the tracked tree (so the build leaves nothing in the
checkout) with ``pip wheel --no-build-isolation``, then installed with ``--no-deps`` into a
fresh venv that has no pip of its own. The core dependencies are copied into that venv from
the running environment, file by file as their RECORDs list them, following ``Requires-Dist``
without extras: no network, a few seconds, and ``pip check`` proves the closure is what the
wheel declares. An import the wheel forgot to declare fails here, as it would for a user.
Every command runs with the venv's interpreter from a directory outside the checkout, so
nothing is imported from the source tree.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import websockets
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers.ports import free_port, wait_for_port
from helpers.servers import ROOT

#: What the installed tools read at run time besides Python modules.
DATA_FILES = (
    "wsfan/py.typed",
    "wsfan/client/js/wsfan.js",
    "wsfan/client/js/demo.html",
    "wsfan/bench/baselines/bun_server.js",
    "wsfan/bench/tools/connect_client.c",
    "wsfan/loadtest/swarm.sh",
    *(f"wsfan/loadtest/conf/{p.name}" for p in sorted((ROOT / "loadtest" / "conf").glob("*.conf"))),
    *(f"wsfan/loadtest/scenarios/{p.name}" for p in sorted((ROOT / "loadtest" / "scenarios").glob("*.py"))),
)
#: Distributions that only extras bring; a plain install must not have them.
EXTRAS_ONLY = ("redis", "locust", "numpy", "matplotlib", "psutil")


@dataclass
class Installed:
    """A fresh venv with the wheel installed without extras."""

    wheel: Path
    venv: Path
    workdir: Path  # outside the checkout: nothing importable from the source tree

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def wsfan(self) -> Path:
        return self.venv / "bin" / "wsfan"

    def run(self, *args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def _copy_source(dest: Path) -> Path:
    """The tracked files of the checkout (``git ls-files``), or the tree minus local state without git."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=30)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        ignore = shutil.ignore_patterns(".venv", ".git", "results", "node_modules", "build", "*.egg-info")
        shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)
    return dest


def _core_closure(requires: list[str]) -> dict[str, metadata.Distribution]:
    """Every installed distribution that ``requires`` needs, transitively, with only the extras it names."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), "") for r in requires]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(
                f"core dependency {req.name} is not installed here: run `make install`", pytrace=False
            )
        if name not in found:
            found[name] = dist
            todo += [(Requirement(r), "") for r in dist.requires or []]
        for wanted in req.extras:
            todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return found


def _copy_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Install an already-installed distribution by copying the files its RECORD lists."""
    for file in dist.files or []:
        src = Path(dist.locate_file(file))
        dst = site / file
        if not src.is_file() or not dst.resolve().is_relative_to(site.resolve()):
            continue  # console scripts (../../bin) and __pycache__ entries missing on disk
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _build_and_install(base: Path, env: dict[str, str] | None = None) -> Installed:
    """Build the wheel from a copy of the tracked tree (``env``: the build's environment) and install it."""
    src = _copy_source(base / "src")
    dist = base / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("wsfan-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    (site,) = (env_dir / "lib").glob("python3*/site-packages")
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = metadata.PathDistribution(zipfile.Path(zf, info.rsplit("/", 1)[0] + "/")).requires or []
    for dist_ in _core_closure(requires).values():
        _copy_distribution(dist_, site)
    pip = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python")]
    done = subprocess.run(
        [*pip, "install", "-q", "--no-index", "--no-deps", str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = base / "work"
    workdir.mkdir()
    return Installed(wheel=wheel, venv=env_dir, workdir=workdir)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return _build_and_install(tmp_path_factory.mktemp("packaging"))


@pytest.fixture(scope="module")
def installed_without_compiler(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The same, built where the C compiler fails (``CC=false``): the optional C module is left out."""
    return _build_and_install(tmp_path_factory.mktemp("packaging-nocc"), env={**os.environ, "CC": "false"})


# ---------------------------------------------------------------- the wheel's contents


def test_wheel_has_one_top_level_name_and_no_tests(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {
        "wsfan",
        f"{installed.wheel.name.split('-')[0]}-{installed.wheel.name.split('-')[1]}.dist-info",
    }
    assert not [n for n in names if "/tests/" in n or "/micro/" in n or Path(n).name.startswith("test_")]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_ships_py_typed_and_the_data_files_the_tools_read(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = set(zf.namelist())
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, missing
    assert len(DATA_FILES) > 10  # the globs above found the conf and scenario files


def test_plain_install_has_its_dependencies_and_none_of_the_extras(installed: Installed) -> None:
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(installed.python), "check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    probe = "import importlib.util, json, sys; print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))"
    found = installed.run(installed.python, "-c", probe, *EXTRAS_ONLY, "jwt", "aiohttp", "prometheus_client")
    assert json.loads(found.stdout) == ["jwt", "aiohttp", "prometheus_client"], found.stderr
    where = installed.run(installed.python, "-c", "import wsfan.server, sys; print(wsfan.server.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), "imported from outside the venv"


# ---------------------------------------------------------------- the installed command


def test_installed_wsfan_help_lists_the_server_flags(installed: Installed) -> None:
    r = installed.run(installed.wsfan, "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--port", "--broker", "--jwt-secret", "--http-port"):
        assert flag in r.stdout


def test_installed_server_welcomes_a_client_and_exits_0_on_sigterm(installed: Installed) -> None:
    _welcomes_and_stops(installed)


def _welcomes_and_stops(installed: Installed) -> None:
    port = free_port()
    log = installed.workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(installed.wsfan), "--host", "127.0.0.1", "--port", str(port)],
            cwd=installed.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port(port, timeout=20, proc=proc)

        async def welcome() -> dict:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 5))

        assert asyncio.run(welcome())["type"] == "welcome"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


_TRACKS = "from wsfan.server import heap; print(heap.track_arenas())"


def test_wheel_carries_the_pools_module_and_the_installed_server_gives_pools_back(
    installed: Installed,
) -> None:
    """server/_pools.c (server/heap.py, point 5) is compiled into the wheel and usable where it is installed."""
    with zipfile.ZipFile(installed.wheel) as zf:
        built = [n for n in zf.namelist() if n.startswith("wsfan/server/_pools.") and n.endswith(".so")]
    assert built, "the wheel has no compiled wsfan/server/_pools module"
    assert "-none-any" not in installed.wheel.name, "a wheel with a C module is tagged for its platform"
    r = installed.run(installed.python, "-c", _TRACKS)
    assert r.stdout.split() == ["True"], r.stderr


def test_without_a_c_compiler_the_install_goes_on_and_the_server_runs_without_the_module(
    installed_without_compiler: Installed,
) -> None:
    """The C module is optional (pyproject.toml): where it cannot be compiled, the wheel is pure Python,
    ``track_arenas`` says False and the server works as before."""
    with zipfile.ZipFile(installed_without_compiler.wheel) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".so")]
    r = installed_without_compiler.run(installed_without_compiler.python, "-c", _TRACKS)
    assert r.stdout.split() == ["False"], r.stderr
    _welcomes_and_stops(installed_without_compiler)


@pytest.mark.parametrize(
    "args, extra",
    [
        (("--broker", "redis://127.0.0.1:1/0"), "redis"),
        (("bench", "core", "--quick"), "bench"),
        (("swarm", "--run-time", "1s"), "loadtest"),
    ],
    ids=["broker-redis", "bench", "swarm"],
)
def test_a_missing_extra_is_one_line_naming_it_and_exit_2(
    installed: Installed, args: tuple, extra: str
) -> None:
    r = installed.run(installed.wsfan, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert f"wsfan[{extra}]" in lines[0], lines[0]


def test_locust_scenarios_and_confs_resolve_inside_the_installed_package(installed: Installed) -> None:
    """swarm finds scenario and conf files next to its module, so an installed wheel runs them too."""
    code = (
        "import json; from wsfan.loadtest import swarm\n"
        "print(json.dumps({'scenarios': {s: str(swarm.scenario_file(s)) for s in swarm.SCENARIOS},\n"
        "  'confs': {c: str(swarm.conf_locustfile(swarm.CONF_DIR / (c + '.conf'))) for c in swarm.conf_names()}}))"
    )
    r = installed.run(installed.python, "-c", code)
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)
    assert set(paths["confs"]) == {p.stem for p in (ROOT / "loadtest" / "conf").glob("*.conf")}
    for path in [*paths["scenarios"].values(), *paths["confs"].values()]:
        assert Path(path).is_file() and Path(path).is_relative_to(installed.venv), path
