"""A TCP server that counts the connections made to it: what a test asserts instead of how long a client waited."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """Listens on 127.0.0.1 and never answers: each connection is dropped at once (`hang=False`, a server that is
    not MLflow's) or held open until `close` (`hang=True`, a hung server). `connections` counts them, so a test can
    tell one request from a client that retried."""

    def __init__(self, *, hang: bool):
        self._hang = hang
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # accept wakes up to notice `close`
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            if self._hang:
                self._held.append(connection)
            else:
                connection.close()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()
        for connection in self._held:
            connection.close()
        self._listener.close()
