"""Locust load generator for the wsfan WebSocket pub/sub server.

The locustfiles live in ``loadtest/locustfile.py`` (every user class) and
``loadtest/scenarios/*.py`` (one scenario each, some with a load shape); the
machinery they share lives in this package so that it is imported exactly once
per process, however many locustfiles Locust loads. See ``loadtest/README.md``.
"""
