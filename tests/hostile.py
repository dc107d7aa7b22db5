"""Generators of hostile inputs (issue 12) and a loopback HTTP server; nothing large is committed."""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def png_header(width: int, height: int, idat: bytes = b"\x00" * 16) -> bytes:
    """A valid-looking 8-bit grayscale PNG that declares width x height (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b"")


class _Handler(BaseHTTPRequestHandler):
    server_version = "hostile/1"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        srv = self.server
        path = self.path.split("?", 1)[0]
        srv.log.append((self.command, path, self.headers.get("Authorization")))
        if path in srv.flaky and srv.flaky[path] > 0:
            srv.flaky[path] -= 1
            self.close_connection = True
            return  # drop the connection without an answer: a transient error
        if path == "/huge.png":  # declares 1.5 GB; sends almost nothing
            self.send_response(200)
            self.send_header("Content-Length", str(1_500_000_000))
            self.end_headers()
            return
        if path == "/endless.png":  # no length; streams until the reader stops
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                try:
                    for _ in range(256):
                        self.wfile.write(b"\x00" * 65536)
                except OSError:
                    pass
            self.close_connection = True
            return
        body = srv.files.get(path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


@contextmanager
def http_server(files: dict[str, bytes], flaky: dict[str, int] | None = None):
    """Serve ``files`` (path -> bytes) on 127.0.0.1; yields (base URL, request log)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.flaky, srv.log = dict(files), dict(flaky or {}), []
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv.log
    finally:
        srv.shutdown()
        srv.server_close()


@contextmanager
def silent_server():
    """Accepts connections and never answers; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        sock.close()
