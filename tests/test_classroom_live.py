"""``diffwidget demo --classroom live``: the live page served read-only as static files.

The server (:mod:`diffwidget.cli.static_site`) is tested in-process on a small folder with
a file outside it to reach for; the command is run for real on a free port (the real live
folder, served, then stopped by a signal). The page in a browser is
``tests/browser/test_browser_live.py``'s static-host test, which runs on this server too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffwidget import cli
from diffwidget.cli import static_site
from diffwidget.cli.serve import process_tree
from diffwidget.widget import live
from tests.test_classroom import PRINTED_URL, alive, free_port, wait_until
from tests.test_cli import run

START_S = 120
STOP_S = 30
SECRET = "outside the served folder"


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[int]:
    """``folder`` served by the classroom's server on a free port, in a thread."""
    server = static_site.make_server(folder, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """``path`` sent as written (no client-side normalisation of ``..`` or ``%2e``)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder to serve, beside a secret file and with a link leading out of it."""
    (tmp_path / "secret.txt").write_text(SECRET)
    folder = tmp_path / "site"
    (folder / "sub").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><p>page</p>")
    (folder / "runtime.wasm").write_bytes(b"\0asm\1\0\0\0")
    (folder / "sub" / "live.js").write_text("export const x = 1;")
    (folder / "sub" / "graph.onnx").write_bytes(b"\x08\x07")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    return folder


def test_files_are_served_with_their_content_types(site: Path) -> None:
    with serving(site) as port:
        expected = {
            "/": ("text/html; charset=utf-8", site / "index.html"),
            "/index.html?token=ignored": ("text/html; charset=utf-8", site / "index.html"),
            "/runtime.wasm": ("application/wasm", site / "runtime.wasm"),
            "/sub/live.js": ("text/javascript; charset=utf-8", site / "sub" / "live.js"),
            "/sub/graph.onnx": ("application/octet-stream", site / "sub" / "graph.onnx"),
            "/sub/%6Cive.js": ("text/javascript; charset=utf-8", site / "sub" / "live.js"),
        }
        for path, (content_type, file) in expected.items():
            status, headers, body = request(port, path)
            assert status == 200, path
            assert headers["Content-Type"] == content_type
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert body == file.read_bytes()
            assert int(headers["Content-Length"]) == len(body)
        status, headers, body = request(port, "/runtime.wasm", "HEAD")
        assert (status, headers["Content-Type"], body) == (200, "application/wasm", b"")


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/sub/..%2f..%2fsecret.txt",
        "//secret.txt",
        "/link.txt",  # a symbolic link out of the folder
        "/sub/",  # no directory listing
        "/sub",
        "/%ff",  # not UTF-8
        "/index.html%00.txt",
        str(Path("/") / "etc" / "passwd"),
    ],
)
def test_nothing_outside_the_folder_and_no_listing(site: Path, path: str) -> None:
    with serving(site) as port:
        status, _, body = request(port, path)
    assert status == 404
    assert SECRET.encode() not in body
    assert b"live.js" not in body


def test_only_get_and_head_are_answered(site: Path) -> None:
    with serving(site) as port:
        for method in ("POST", "PUT", "DELETE"):
            status, _, _ = request(port, "/index.html", method)
            assert status == 501, method
    assert (site / "index.html").read_text() == "<!doctype html><p>page</p>"


def test_live_is_a_classroom_mode_and_chosen_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set(cli.classroom.CLASSROOM_MODES) == {"voila", "live"}
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "MODE (one of live, voila)" in help_text
    chosen: list[cli.classroom.Classroom] = []

    def record(room: cli.classroom.Classroom, env: dict[str, str]) -> int:
        chosen.append(room)
        return 0

    monkeypatch.setitem(cli.classroom.CLASSROOM_MODES, "live", record)
    monkeypatch.chdir(tmp_path)
    status, _, _ = run(["demo", "--classroom", "live", "--ip", "0.0.0.0", "--no-browser"], capsys)
    assert status == 0
    assert len(chosen) == 1
    assert chosen[0].ip == "0.0.0.0"
    assert chosen[0].token is None  # off loopback too: nothing on the server runs code
    assert not (tmp_path / "diffwidget-demo").exists()  # no notebook copied for a page


@pytest.mark.parametrize(
    "option",
    [
        ["--token"],
        ["--no-token"],
        ["--max-students", "5"],
        ["--notebook", "03"],
    ],
)
def test_options_live_cannot_honour_are_refused(
    option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(["demo", "--classroom", "live", "--no-browser", *option], capsys)
    assert status == cli.EXIT_USAGE
    assert option[0].split("/")[0] in err
    assert "--classroom voila" in err


def _site_folder(pid: int) -> Path:
    """The folder the command's static server serves, from its command line in /proc."""
    for child in process_tree(pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"diffwidget.cli.static_site" in argv:
                return Path(argv[argv.index(b"diffwidget.cli.static_site") + 1].decode())
    pytest.fail("no static server under the command")


def _start(
    tmp_path: Path, options: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp_path / "demo.log"
    command = [sys.executable, "-m", "diffwidget.cli", "demo", "--classroom", "live"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--no-browser", "--port", str(port), *options],
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the command exited with {process.returncode}:\n{log.read_text()}")
        urls = PRINTED_URL.findall(log.read_text())
        if not urls:
            return False
        with contextlib.suppress(OSError):
            request(port, "/", "HEAD")
            return True
        return False

    wait_until(ready, START_S, "the live classroom serving")
    return process, port, log


@pytest.mark.skipif(not live.LIVE_JS.is_file(), reason="needs npm run build in js/")
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server through /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_the_live_page_and_stops_on_a_signal(
    tmp_path: Path, signum: int
) -> None:
    process, port, log = _start(tmp_path)
    try:
        text = log.read_text()
        assert PRINTED_URL.findall(text) == [f"http://127.0.0.1:{port}/"]  # no token in it
        assert "no cap on students and no token" in text
        folder = _site_folder(process.pid)
        tree: dict[int, Any] = process_tree(process.pid)
        status, headers, body = request(port, "/")
        assert status == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert body == (folder / "index.html").read_bytes()
        assert b'import { start } from "./live.js"' in body
        status, headers, body = request(port, f"/{live.WASM_FILE}")
        assert (status, headers["Content-Type"]) == (200, "application/wasm")
        assert body == (live.STATIC / live.WASM_FILE).read_bytes()
        status, _, _ = request(port, "/%2e%2e/" + folder.name + "/index.html")
        assert status == 404
    finally:
        process.send_signal(signum)
        try:
            status = process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert status == 0
    deadline = time.monotonic() + STOP_S
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        time.sleep(0.2)
    assert not [pid for pid in tree if alive(pid)]
    assert not folder.exists()  # the temporary page is gone with the command


def test_classroom_parses_live_and_defaults_to_voila() -> None:
    args = cli.build_parser().parse_args(["demo", "--classroom", "live"])
    assert args.classroom == cli.classroom.LIVE_MODE
    assert cli.build_parser().parse_args(["demo", "--classroom"]).classroom == "voila"


def test_a_notebook_takes_one_model_and_live_one_or_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run(["demo", "--model", "unet", "dit", "--no-browser"], capsys)
    assert status == cli.EXIT_USAGE
    assert "--classroom live" in err
    status, _, err = run(["demo", "--classroom", "live", "--model", "dit", "dit"], capsys)
    assert status == cli.EXIT_USAGE
    assert "twice" in err


@pytest.mark.skipif(not live.LIVE_JS.is_file(), reason="needs npm run build in js/")
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server through /proc")
@pytest.mark.parametrize("models", [("dit",), ("unet", "dit")])
def test_the_command_serves_the_models_asked_for(tmp_path: Path, models: tuple[str, ...]) -> None:
    process, port, _ = _start(tmp_path, ("--model", *models))
    try:
        folder = _site_folder(process.pid)
        status, _, body = request(port, "/")
        assert status == 200
        config = json.loads(
            re.search(rb'id="diffwidget-live-config">(.*?)</script>', body, re.S).group(1)
        )
        assert [m["manifest"]["model"] for m in config["models"]] == list(models)
        for model in models:
            status, _, manifest = request(port, f"/{model}/manifest.json")
            assert status == 200
            assert manifest == (folder / model / "manifest.json").read_bytes()
        status, _, _ = request(port, "/dit/transformer.onnx", "HEAD")
        assert status == 200
        status, _, _ = request(port, "/unet/unet.onnx", "HEAD")
        assert status == (200 if "unet" in models else 404)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
