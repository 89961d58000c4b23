"""Applications built on wsfan's application API (docs/app-api.md); each has a test in tests/test_examples.py."""
