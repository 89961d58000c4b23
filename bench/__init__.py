"""Benchmarks: ``python -m wsfan.bench <scenario>``; ``make bench`` runs ``python -m wsfan.bench all`` (see bench/README.md).

Layout: ``harness.py`` (pinned server and load-generator processes, CPU/RSS
sampling, bottleneck attribution), ``loadgen.py`` (the load-generator
process) running one role of ``roles/`` (``roles/base.py``: what every role shares; ``roles/core.py``:
the core scenario's closed-loop roles; one ``ROLES`` registry), ``servers.py`` (our server, its variants and the baselines),
``scenarios/`` (one module per scenario), ``suite.py`` (what the scenarios of the
full suite share), ``latency.py`` (percentiles and histograms), ``report.py`` and
``plots.py`` (markdown and PNGs from the JSON files), ``baselines/`` (reference
servers), ``micro/`` (pytest-benchmark micro benchmarks). Runs land in the git-ignored
``results/local/`` (``--quick``: ``results/tmp/``); only ``--publish`` writes the committed
``results/<YYYYMMDD-HHMM>-<host>/``, ``results/latest.md``, ``results/core-*.json`` and
``results/core-latest.md`` (see ``results.results_dir``).
"""
