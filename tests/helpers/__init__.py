"""The test suite's one helpers package: every test file imports its tools from here.

- ``ports``: ``free_port``, ``port_open``, ``wait_for_port`` (127.0.0.1 only).
- ``servers``: ``ServerProcess``, a real ``python -m wsfan`` child process (start, SIGTERM, SIGKILL,
  SIGSTOP/SIGCONT, log, /metrics).
- ``redis_server``: ``RedisServer``, a real ``redis-server`` without persistence on a free port.
- ``peers``: ``PicowsPeer`` and ``WebsocketsPeer``, two independent client libraries behind one interface.
- ``rawws``: ``RawWS``, a blocking socket client that can send what libraries refuse to.
- ``waiting``: ``run`` (an async body with a hard timeout), ``until`` / ``wait_until`` (poll a predicate).
- ``client_tools``: ``take`` and ``hold_reconnects`` for tests of the Python client.

``tests/`` is put on ``sys.path`` by ``conftest.py``, so test files write ``from helpers.servers import ...``.
"""
