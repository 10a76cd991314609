"""A real HTTP server on 127.0.0.1 for tests: static files with `Range` support, and injected faults.

`FaultPlan` rules fail the first N requests whose path matches a regex, in one of these ways:
  503       answer `503 Service Unavailable`
  500       answer `500 Internal Server Error`
  drop      close the connection without answering
  reset     close it with a TCP RST (SO_LINGER 0), as a crashed proxy does
  truncate  send the headers (full Content-Length) and half the body, then close
  stall     send the headers (full Content-Length), then nothing until the server stops
  endless   GET: send 200 without a Content-Length and an endless body, Range ignored (until the
            client hangs up); HEAD: answered truly (the server declares the real size, then misbehaves)
  endless206  GET: as endless, but as the answer to the Range asked (206, its Content-Range): a range
            that never ends
  undeclared  GET: as endless; HEAD: 200 without a Content-Length (the server declares no size at all)
  undeclared-whole  GET: the whole file, 200 without a Content-Length, Range ignored; HEAD: as undeclared
An endless body stops at ENDLESS_CAP bytes; `handler.sent[0]` counts the bytes they sent, an upper
bound of what the client read (plus the kernel's socket buffers).
Files are served with an `ETag` (from size and mtime, as nginx does) and `If-Match` is honoured (412
when it differs). `serve(..., accept_ranges="none")` makes the server say `Accept-Ranges: none`
and ignore Range. Every request is logged as (method, path, Range header) in `server.requests`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ENDLESS_CAP = 256 << 20  # bytes: a client that reads on without bound fails its test, it does not hang


@dataclass
class FaultPlan:
    rules: list[list] = field(default_factory=list)  # [regex, kind, remaining count]
    injected: int = 0

    def add(self, pattern: str, kind: str, count: int = 1) -> FaultPlan:
        self.rules.append([re.compile(pattern), kind, count])
        return self

    def take(self, path: str) -> str | None:
        for rule in self.rules:
            if rule[2] > 0 and rule[0].search(path):
                rule[2] -= 1
                self.injected += 1
                return rule[1]
        return None

    def pending(self) -> int:
        return sum(r[2] for r in self.rules)


class Handler(http.server.SimpleHTTPRequestHandler):
    ranges = True
    accept_ranges: str | None = None
    plan: FaultPlan | None = None
    requests: list = []
    sent: list = [0]
    lock = threading.Lock()
    stopping: threading.Event = threading.Event()

    def end_headers(self) -> None:
        path = self.translate_path(self.path)
        if os.path.isfile(path):
            st = os.stat(path)
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
        if self.accept_ranges:
            self.send_header("Accept-Ranges", self.accept_ranges)
        super().end_headers()

    def _etag_mismatch(self) -> bool:
        want = self.headers.get("If-Match")
        path = self.translate_path(self.path)
        if want is None or not os.path.isfile(path):
            return False
        st = os.stat(path)
        return want != f'"{st.st_mtime_ns:x}-{st.st_size:x}"'

    def log_message(self, *args) -> None:
        pass

    def _fault(self) -> bool:
        with self.lock:
            self.requests.append((self.command, self.path, self.headers.get("Range")))
            kind = self.plan.take(self.path) if self.plan is not None else None
        if kind is None:
            return False
        self.close_connection = True
        if kind in ("503", "500"):
            self.send_error(int(kind), "injected fault")
        elif kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == "truncate" and self.command == "GET":
            f = self.send_head()
            if f is not None:
                data = f.read()
                f.close()
                self.wfile.write(data[: len(data) // 2])
        elif kind == "stall":
            f = self.send_head()
            if f is not None:
                f.close()
            self.wfile.flush()
            self.stopping.wait()
        elif kind.startswith("undeclared") and self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
        elif kind == "undeclared-whole":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            with open(self.translate_path(self.path), "rb") as f:
                self.wfile.write(f.read())
        elif kind in ("endless", "endless206", "undeclared") and self.command == "GET":
            ranged = kind == "endless206" and self.headers.get("Range")
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/json")
            if ranged:
                a, _, b = self.headers["Range"].removeprefix("bytes=").partition("-")
                self.send_header("Content-Range", f"bytes {a or 0}-{b or 0}/{2 ** 40}")
            self.end_headers()
            try:
                while not self.stopping.is_set() and self.sent[0] < ENDLESS_CAP:
                    self.wfile.write(b" " * 65536)
                    with self.lock:
                        self.sent[0] += 65536
            except OSError:
                pass  # the client hung up
        elif kind in ("endless", "endless206"):  # HEAD: the truth
            self.close_connection = False
            return False
        return True  # "drop" (and truncate of a HEAD): answer nothing

    def do_GET(self) -> None:
        if self._etag_mismatch():
            with self.lock:
                self.requests.append((self.command, self.path, self.headers.get("Range")))
            self.send_error(412, "Precondition Failed")
        elif not self._fault():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._fault():
            super().do_HEAD()

    def send_head(self):
        """Single `Range: bytes=a-b` / `bytes=-n`, as S3, GCS and nginx serve them."""
        path = self.translate_path(self.path)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not self.ranges or m is None or os.path.isdir(path):
            return super().send_head()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.send_error(404)
            return None
        a, b = m.groups()
        start, end = ((len(data) - int(b), len(data)) if a == ""
                      else (int(a), min(len(data), int(b) + 1 if b else len(data))))
        start = max(0, start)
        if start >= len(data) and len(data):
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        return io.BytesIO(data[start:end])


@contextlib.contextmanager
def serve(directory: Path, ranges: bool = True, plan: FaultPlan | None = None, accept_ranges: str | None = None
          ) -> Iterator[tuple[str, type]]:
    """Serve `directory` on a free port in a thread; yields (base URL, handler class with .requests/.plan/.sent)."""
    if accept_ranges == "none":
        ranges = False
    handler = type("H", (Handler,), {"ranges": ranges, "plan": plan, "requests": [], "lock": threading.Lock(),
                                     "sent": [0], "accept_ranges": accept_ranges, "stopping": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        handler.stopping.set()  # releases stalled and endless answers
        server.shutdown()
        server.server_close()
        thread.join()
