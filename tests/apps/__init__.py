"""Applications the tests serve with ``--app`` (PYTHONPATH=tests): each exercises one part of the API."""
