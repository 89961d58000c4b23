# Every target works on a fresh clone with nothing but python3 installed: the venv is made on demand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8765
ARGS   ?=

.PHONY: help install serve test test-browser lint format conformance bench bench-core bench-quick bench-micro swarm token clean

help:
	@echo "make serve        run a single-node server on 127.0.0.1:$(PORT) (ARGS='--flag value' for more)"
	@echo "make test         run the whole test suite against real server processes"
	@echo "make lint         ruff check + format check"
	@echo "make conformance  RFC 6455 conformance: Autobahn|Testsuite fuzzingclient against /echo"
	@echo "make bench        the full benchmark suite (~9 min): tables in results/latest.md, plots and JSON in results/<date>-<host>/"
	@echo "make bench-quick  the same in CI size (under a minute)"
	@echo "make bench-micro  pytest-benchmark micro benchmarks, compared with the last stored run"
	@echo "make bench-core   server CPU per delivery vs a naive picows loop, memory per idle connection"
	@echo "make swarm        a short headless Locust chat run against a local server"
	@echo "make token        print a JWT (ARGS='--sub alice --secret S')"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m wsfan --host 127.0.0.1 --port $(PORT) --demo $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

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

bench-quick: install
	$(PY) -m wsfan.bench all --quick $(ARGS)

bench-micro: install
	$(PY) -m pytest bench/micro -q -p no:cacheprovider --benchmark-only --benchmark-storage=file://./results/micro --benchmark-autosave --benchmark-compare --benchmark-sort=name --benchmark-columns=min,median,mean,stddev,rounds $(ARGS)

bench-core: install
	$(PY) -m wsfan.bench core $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

token: install
	$(PY) -m wsfan token $(ARGS)

swarm: install
	bash loadtest/swarm.sh $(ARGS)

test-browser: install
	$(PY) -m pytest -q tests/test_browser.py tests/test_client_storm.py
