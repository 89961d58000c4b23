"""``TcpProxy``: a TCP relay on a free 127.0.0.1 port to a target port, which a test can cut (every
relayed connection reset, new ones refused) and restore: a network partition between a node and
Redis while Redis keeps its data (a restart would lose it). With ``delay`` it also adds that many
seconds to each direction (what ``tc qdisc ... netem delay`` does, without root): every chunk is
passed on ``delay`` s after it arrived, in order, bandwidth untouched, so a round trip costs at
least ``2 * delay`` however idle the machine is."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time

from helpers.ports import free_port


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1", delay: float = 0.0) -> None:
        self.host = host
        self.delay = delay
        self.record = False  # while True, what clients send is kept in ``sent`` (one item per chunk)
        self.sent: list[bytes] = []
        self.target = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stopped = False

    def start(self) -> TcpProxy:
        """Listen (again) and relay."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Stop listening and reset every relayed connection (both sides see the loss at once)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            with contextlib.suppress(OSError):
                s.close()

    def stop(self) -> None:
        self._stopped = True
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                if self.delay > 0:
                    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                    up = a is client
                    threading.Thread(target=self._read_into, args=(a, chunks, up), daemon=True).start()
                    threading.Thread(target=self._write_from, args=(chunks, a, b), daemon=True).start()
                else:
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _shut(src, dst)

    def _read_into(self, src: socket.socket, chunks: queue.SimpleQueue, up: bool) -> None:
        """Each chunk read, stamped with when it is due on the other side; ``b""`` at the end."""
        data = b""
        try:
            while data := src.recv(65536):
                if up and self.record:
                    self.sent.append(data)
                chunks.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        chunks.put((time.monotonic() + self.delay, b""))

    @staticmethod
    def _write_from(chunks: queue.SimpleQueue, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _shut(src, dst)


def _shut(*socks: socket.socket) -> None:
    """Shut both directions of each socket, ignoring ones already gone: the other side sees the end."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
