# Every target works on a fresh clone with nothing but python3 installed: the venv is made on demand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8765
ARGS   ?=
TEST_JOBS ?= 4

.PHONY: help install venv-check serve test test-browser lint format conformance bench bench-quick bench-core bench-micro bench-publish swarm token clean

# `make help` prints every .PHONY target (tests/test_makefile.py checks that none is missing).
help:
	@echo "make help          this list"
	@echo "make install       the .venv with wsfan editable and every extra (other targets do it on demand)"
	@echo "make serve         run a single-node server on 127.0.0.1:$(PORT) (ARGS='--flag value' for more)"
	@echo "make test          run the whole test suite against real server processes"
	@echo "make test-browser  only the browser (Chromium) and client storm tests"
	@echo "make lint          ruff check + format check"
	@echo "make format        ruff format + ruff check --fix"
	@echo "make conformance   RFC 6455 conformance: Autobahn|Testsuite fuzzingclient against /echo (needs a Python 2.7, see README)"
	@echo "make bench         the full benchmark suite (~17 min) into results/local/ (git-ignored)"
	@echo "make bench-quick   the same in CI size (about 2-3 min on 2 cores: 2 min 4 s measured on a shared machine) into results/tmp/ (git-ignored)"
	@echo "make bench-core    server CPU per delivery vs a naive picows loop, memory per idle connection, into results/local/"
	@echo "make bench-micro   pytest-benchmark micro benchmarks, compared with the last local run (results/local/micro/)"
	@echo "make bench-publish bench-core + bench on a quiet machine, written to the committed results/ (latest.md, core-latest.md)"
	@echo "make swarm         a short headless Locust chat run against a local server"
	@echo "make token         print a JWT: WSFAN_JWT_SECRET=<32+ random bytes> make token ARGS='--sub alice' (the command line is not echoed)"
	@echo "make venv-check    fail with advice if $(VENV) was made by a Python older than 3.11"
	@echo "make clean         remove $(VENV) and the caches"

# A .venv left by a too-old Python (< 3.11) breaks every later target: say so instead.
venv-check:
	@if [ -e $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "$(VENV) was made by Python $$($(PY) -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(unknown: it does not run)'); wsfan needs Python 3.11 or newer." >&2; \
		echo "Run 'make clean', then 'make install PYTHON=python3.11' (or any python3 >= 3.11)." >&2; \
		exit 1; \
	fi
	@if [ ! -e $(PY) ] && ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "$(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(not found)'); wsfan needs 3.11 or newer: make install PYTHON=python3.11" >&2; \
		exit 1; \
	fi

$(VENV)/.installed: pyproject.toml server/_pools.c | venv-check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m wsfan --host 127.0.0.1 --port $(PORT) --demo $(ARGS)

# Three pytest workers, a whole file each (--dist loadfile keeps a module's shared servers in one process).
# Most tests wait on sockets, so four share the 2-core CI machine well: 1,770 tests in 7 min 14 s,
# three workers 8 min 10 s (clean clone, 2026-11-30 17:20). TEST_JOBS=0 runs everything in one process.
test: install
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

conformance: install
	bash tests/conformance/install_autobahn.sh
	$(PY) tests/conformance/run_autobahn.py --outdir results/conformance

bench: install
	$(PY) -m wsfan.bench all $(ARGS)

bench-publish: install
	$(PY) -m wsfan.bench core --publish $(ARGS)
	$(PY) -m wsfan.bench all --publish $(ARGS)

bench-quick: install
	$(PY) -m wsfan.bench all --quick $(ARGS)

bench-micro: install
	$(PY) -m pytest bench/micro -q -p no:cacheprovider --benchmark-only --benchmark-storage=file://./results/local/micro --benchmark-autosave --benchmark-compare --benchmark-sort=name --benchmark-columns=min,median,mean,stddev,rounds $(ARGS)

bench-core: install
	$(PY) -m wsfan.bench core $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build
	rm -f server/_pools.*.so

# @: make does not echo the command line, which would print a --secret given in ARGS (prefer the
# environment: WSFAN_JWT_SECRET=... make token ARGS='--sub alice', out of the shell's history too).
token: install
	@$(PY) -m wsfan token $(ARGS)

swarm: install
	bash loadtest/swarm.sh $(ARGS)

test-browser: install
	$(PY) -m pytest -q tests/test_browser.py tests/test_client_storm.py
