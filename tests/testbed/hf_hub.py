"""A local stand-in for the Hugging Face hub's download endpoint, over HTTPS with a test CA.

``GET /{org}/{repo}/resolve/{revision}/{file}`` serves a registered file when the request carries
``Authorization: Bearer <token>`` of a valid token (401 without one or with an unknown one, 403 with a
revoked one, 404 for anything not registered), honours ``Range: bytes=N-`` (206), and on demand cuts the
next response short (a dropped connection mid-download) or trickles it (to sample ``ps`` meanwhile).
It records every request (path, whether it was authorized, its range) without the token.

The certificates come from ``openssl``: a CA (installed into test hosts, as a user's host trusts the
real hub's), and a server certificate for 127.0.0.1 signed by it.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gpubox.bench import free_port

RANGE = re.compile(r"^bytes=(\d+)-$")


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) under ``directory``: a fresh CA, a cert for 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
            "-days", "2", "-subj", "/CN=gpubox test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extensions))  # fmt: skip
    return ca_cert, cert, key


@dataclass
class Request:
    path: str
    authorized: bool
    range: str | None
    status: int


@dataclass
class FakeHub:
    """The hub: files by URL path, the tokens it accepts, and what to do to the next responses."""

    certificates: tuple[Path, Path, Path]
    files: dict[str, bytes] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    cut_next_after: int | None = None
    """Bytes after which the next file response is cut off (its Content-Length promised more)."""
    bytes_per_second: int | None = None
    """Trickle responses at this rate (None: at once)."""
    requests: list[Request] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub._answer(self, body=True)

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.certificates[1]), str(self.certificates[2]))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_certificate(self) -> Path:
        return self.certificates[0]

    def add(self, repo: str, revision: str, name: str, content: bytes) -> str:
        """Serve ``content`` as ``name`` of ``repo`` at ``revision``; returns its ``hf://`` reference."""
        self.files[f"/{repo}/resolve/{revision}/{name}"] = content
        return f"hf://{repo}/{name}@{revision}"

    def close(self) -> None:
        self.server.shutdown()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        header = handler.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        wanted = handler.headers.get("Range")
        content = self.files.get(handler.path)
        if token is None or (token not in self.tokens and token not in self.revoked):
            status = 401
        elif token in self.revoked:
            status = 403
        elif content is None:
            status = 404
        else:
            status = 200
        start = 0
        if status == 200 and wanted is not None:
            match = RANGE.match(wanted)
            start = int(match.group(1)) if match else 0
            status = 206 if start < len(content or b"") else 416
        self.requests.append(Request(path=handler.path, authorized=status in (200, 206), range=wanted, status=status))
        if status not in (200, 206):
            message = {401: b"Unauthorized", 403: b"Forbidden", 404: b"Not found", 416: b"Range"}[status]
            handler.send_response(status)
            handler.send_header("Content-Length", str(len(message)))
            handler.end_headers()
            if body:
                handler.wfile.write(message)
            return
        assert content is not None
        payload = content[start:]
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.end_headers()
        if not body:
            return
        cut, self.cut_next_after = self.cut_next_after, None
        if cut is not None:
            payload = payload[:cut]
        step = 64 * 1024
        for offset in range(0, len(payload), step):
            handler.wfile.write(payload[offset : offset + step])
            if self.bytes_per_second:
                time.sleep(step / self.bytes_per_second)
        if cut is not None:
            handler.close_connection = True
            handler.wfile.flush()
            handler.connection.shutdown(2)
