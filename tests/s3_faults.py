"""A reverse proxy in front of the test S3 endpoint (moto) that injects faults on a fixed, seeded schedule.

Whether the n-th request for a key fails, and how, is a function of (seed, key, n) alone, so the schedule does not
depend on how requests of different keys interleave. Faults: 500 InternalError and 503 SlowDown answers with S3's
XML error body, a connection reset (RST after reading the request) and added latency (then the request passes).
At most 2 failing answers in a row per key, so a client that makes 3 attempts always gets through.
"""
from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset", "latency")
ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             '<Resource>{resource}</Resource><RequestId>pfsr-fault-{n}</RequestId></Error>')
ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
          "503": ("SlowDown", "Please reduce your request rate.")}
MAX_IN_A_ROW = 2


class FaultSchedule:
    """fault(key) -> None or one of FAULTS, for the next request of `key` (thread-safe)."""

    def __init__(self, seed: int, rate: float, latency_s: float = 0.3):
        self.seed, self.rate, self.latency_s = seed, rate, latency_s
        self.enabled = False
        self._lock = threading.Lock()
        self._count: Counter = Counter()  # requests seen per key
        self._in_a_row: Counter = Counter()  # failing answers in a row per key
        self.injected: dict[str, int] = defaultdict(int)

    def fault(self, key: str) -> Optional[str]:
        with self._lock:
            if not self.enabled:
                return None
            n = self._count[key]
            self._count[key] += 1
            digest = hashlib.sha256(f"{self.seed}/{key}/{n}".encode()).digest()
            draw, kind = struct.unpack(">Q", digest[:8])[0] / 2 ** 64, FAULTS[digest[8] % len(FAULTS)]
            if draw >= self.rate or (kind != "latency" and self._in_a_row[key] >= MAX_IN_A_ROW):
                self._in_a_row[key] = 0
                return None
            self._in_a_row[key] = 0 if kind == "latency" else self._in_a_row[key] + 1
            self.injected[kind] += 1
            return kind


class S3FaultProxy:
    """Listens on 127.0.0.1:`port` (0: a free one) and forwards to `upstream` (http://host:port)."""

    def __init__(self, upstream: str, schedule: FaultSchedule, port: int = 0):
        target = urlsplit(upstream)
        self.schedule = schedule
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                key = urlsplit(self.path).path
                kind = proxy.schedule.fault(key)
                if kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind in ERRORS:
                    code, message = ERRORS[kind]
                    xml = ERROR_XML.format(code=code, message=message, resource=key,
                                           n=proxy.schedule.injected[kind]).encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if kind == "latency":
                    threading.Event().wait(proxy.schedule.latency_s)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "expect")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, without the object.
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
