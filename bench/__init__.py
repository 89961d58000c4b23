"""Benchmarks: ``python -m bench <scenario>`` (``make bench-core`` runs ``python -m bench core``).

Layout: ``harness.py`` (pinned server and load-generator processes, CPU/RSS
sampling, result files), ``loadgen.py`` (the picows load-generator process),
``scenarios/`` (one module per scenario), ``baselines/`` (reference servers).
Results land in ``results/<scenario>-<timestamp>.json`` (raw, with machine
info) and ``results/<scenario>-latest.md`` (the table); process logs of the
latest run in ``results/tmp/bench/``.
"""
