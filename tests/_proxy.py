"""A TCP proxy on 127.0.0.1 for tests: forwards connections to a server, and injects faults.

`Proxy(upstream_port)` listens on a free port; `plan(kind, count)` makes the next `count` connections
misbehave, one way each:
  drop    read the client's first bytes, then close the connection without an answer
  delay   forward the request, and hold the answer back `delay` seconds before forwarding it
  slow    forward everything, each piece of the answer `delay` seconds late (a slow link)
  stall   forward the request, never the answer (until the proxy stops)
Faults are per connection (clients reuse connections for several requests). `connections` counts
the connections accepted, `injected` the faults done.
"""

from __future__ import annotations

import socket
import threading
from collections import deque


class Proxy:
    def __init__(self, upstream_port: int, delay: float = 1.0) -> None:
        self.upstream, self.delay = ("127.0.0.1", upstream_port), delay
        self.faults: deque[str] = deque()
        self.connections = self.injected = 0
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._start(self._accept)

    def plan(self, kind: str, count: int = 1) -> Proxy:
        assert kind in ("drop", "delay", "slow", "stall"), kind
        with self.lock:
            self.faults.extend([kind] * count)
        return self

    def pending(self) -> int:
        return len(self.faults)

    def _start(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                kind = self.faults.popleft() if self.faults else None
                self.injected += kind is not None
                self._socks.append(client)
            self._start(self._serve, client, kind)

    def _serve(self, client: socket.socket, kind: str | None) -> None:
        if kind == "drop":
            try:
                client.recv(65536)
            finally:
                client.close()
            return
        try:
            up = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self.lock:
            self._socks.append(up)
        self._start(self._pump, client, up, 0.0, False)
        self._pump(up, client, self.delay if kind in ("delay", "slow") else 0.0, kind == "stall", kind == "slow")

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float, hold: bool = False,
              every: bool = False) -> None:
        try:
            while data := src.recv(65536):
                if hold:
                    self.stopping.wait()
                    return
                if delay:
                    self.stopping.wait(delay)
                    delay = delay if every else 0.0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopping.set()
        self.server.close()
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
