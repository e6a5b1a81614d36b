"""A read-only HTTP server for one folder of files (the live page in a classroom).

``diffwidget demo --classroom live`` runs it as ``python -m diffwidget.cli.static_site
FOLDER --ip IP --port PORT`` under :func:`~diffwidget.cli.serve.serve`. What it serves is
fixed when it starts: the regular files inside ``FOLDER`` (``/`` is ``index.html``), each
with a content type from :data:`CONTENT_TYPES`. A request is a look-up in that table, never
a path joined onto the folder, so no URL (``/../``, ``%2e%2e``, a symbolic link leading out)
reaches another file; there is no directory listing, no upload and no code run for a
request. SIGTERM, SIGINT and SIGHUP stop it (it closes its socket and exits with 0).

Examples
--------
$ python -m diffwidget.cli.static_site site --ip 127.0.0.1 --port 8866
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import shutil
import signal
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import ClassVar

#: Content types by suffix; anything else is served as bytes. ``application/wasm`` is what
#: ``WebAssembly.instantiateStreaming`` requires, ``text/javascript`` what a module script
#: requires.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".txt": "text/plain; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
DEFAULT_TYPE = "application/octet-stream"
INDEX = "index.html"
#: Sent with every file: browsers take the content type as given (no sniffing) and ask
#: again after a restart instead of showing the page of an earlier run.
FIXED_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
COPY_CHUNK = 1 << 20


def site_files(folder: Path) -> dict[str, Path]:
    """The URL paths the server answers and the file each one serves.

    Only regular files whose real path lies inside ``folder`` are listed, so a symbolic
    link out of the folder is not served.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "index.html").write_text("<p>hi</p>")
    ...     sorted(site_files(Path(tmp)))
    ['/', '/index.html']
    """
    root = folder.resolve()
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        real = path.resolve()
        if real.is_file() and real.is_relative_to(root):
            files["/" + path.relative_to(root).as_posix()] = real
    if "/" + INDEX in files:
        files["/"] = files["/" + INDEX]
    return files


def content_type(path: Path) -> str:
    """The ``Content-Type`` of ``path``.

    Examples
    --------
    >>> content_type(Path("ort.wasm")), content_type(Path("model.onnx"))
    ('application/wasm', 'application/octet-stream')
    """
    return CONTENT_TYPES.get(path.suffix.lower(), DEFAULT_TYPE)


class SiteHandler(http.server.BaseHTTPRequestHandler):
    """Answers GET and HEAD from :attr:`files`; every other method gets 501 (the base's)."""

    files: ClassVar[dict[str, Path]] = {}

    def version_string(self) -> str:
        """The ``Server`` header: the name only (no Python version for a scanner to read)."""
        return "diffwidget"

    def _file(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path, errors="strict")
        return self.files.get(path)

    def _headers(self) -> Path | None:
        try:
            file = self._file()
        except UnicodeDecodeError:
            file = None
        if file is None:
            self.send_error(http.HTTPStatus.NOT_FOUND)
            return None
        self.send_response(http.HTTPStatus.OK)
        self.send_header("Content-Type", content_type(file))
        self.send_header("Content-Length", str(file.stat().st_size))
        for name, value in FIXED_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        return file

    def do_HEAD(self) -> None:
        self._headers()

    def do_GET(self) -> None:
        file = self._headers()
        if file is not None:
            with file.open("rb") as source:
                shutil.copyfileobj(source, self.wfile, COPY_CHUNK)

    def log_message(self, format: str, *args: object) -> None:
        # A room of page loads (and a 404 for each probe) would flood the teacher's terminal.
        return


class SiteServer(http.server.ThreadingHTTPServer):
    """One thread per connection (a student's download must not wait for another's)."""

    daemon_threads = True


def make_server(folder: Path, ip: str, port: int) -> SiteServer:
    """A server for ``folder`` bound to ``ip:port`` (port 0: any free port).

    Examples
    --------
    >>> server = make_server(Path("."), "127.0.0.1", 0)  # doctest: +SKIP
    """
    handler = type("Handler", (SiteHandler,), {"files": site_files(folder)})
    # IPv6 addresses ("::", "::1") need an IPv6 socket; "" and IPv4 addresses an IPv4 one.
    server_class = type(
        "Server",
        (SiteServer,),
        {"address_family": socket.AF_INET6 if ":" in ip else socket.AF_INET},
    )
    return server_class((ip, port), handler)


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a folder until a stop signal; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m diffwidget.cli.static_site")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if not (args.folder / INDEX).is_file():
        print(f"{args.folder} holds no {INDEX}", file=sys.stderr)
        return 2
    try:
        server = make_server(args.folder, args.ip, args.port)
    except OSError as error:
        print(f"cannot serve on {args.ip}:{args.port}: {error}", file=sys.stderr)
        return 1
    for name in _STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stop)
    with server, contextlib.suppress(SystemExit, KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
