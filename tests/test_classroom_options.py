"""``diffwidget demo --classroom``'s options: token, cap, the Voila command and its config.

No server runs here (``tests/test_classroom.py`` runs real ones): the command line and
environment are built and Voila is initialised from them in-process, as its process would be.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from diffwidget import cli
from tests.test_cli import run, write_notebook


def classroom(notebook: Path, **changes: Any) -> cli.classroom.Classroom:
    fields: dict[str, Any] = {"ip": "127.0.0.1", "port": 8123, "token": None}
    fields.update(max_students=7, open_browser=False)
    fields.update(changes)
    return cli.classroom.Classroom(notebook=notebook, **fields)


def voila_app(command: list[str]) -> Any:
    """Voila initialised from ``command`` as its process would be: config files, flags."""
    from voila.app import Voila

    sigterm = signal.getsignal(signal.SIGTERM)  # Voila installs its own handler
    try:
        app = Voila()
        app.initialize(command[3:])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return app


def test_classroom_command_uses_the_bundled_voila_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("voila")
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "user-config"))
    monkeypatch.chdir(tmp_path)
    notebook = write_notebook(tmp_path / "nb.ipynb", "1")
    command, env = cli.classroom.classroom_command(classroom(notebook), {"PATH": "/usr/bin"})
    assert command[:3] == [sys.executable, "-m", "voila"]
    assert command[3:7] == [
        str(notebook),
        "--port=8123",
        "--Voila.ip=127.0.0.1",
        "--Voila.port_retries=0",  # never serve on another port than the one printed
    ]
    assert "--ClassroomKernelManager.max_kernels=7" in command
    assert command[-1] == "--no-browser"
    assert "JUPYTER_CONFIG_PATH" not in env  # the kernels' config is the user's own

    # Load it as Voila does: a misspelt option would be ignored silently, not fail.
    from diffwidget.cli.classroom_kernels import ClassroomKernelManager

    app = voila_app(command)
    bundled = str(cli.common.jupyter_config_dir())
    assert app.config_file_paths[0] == str(tmp_path)  # Voila's own order first ...
    assert app.config_file_paths[-1] == bundled  # ... then the bundled file, last
    voila = app.voila_configuration
    assert voila.multi_kernel_manager_class is ClassroomKernelManager
    assert "@jupyter-notebook/lab-extension" in voila.extension_denylist
    assert voila.strip_sources  # the point of classroom mode
    kernels = ClassroomKernelManager(config=app.config)
    assert kernels.max_kernels == 7
    assert kernels.unconnected_timeout == 60  # a page that never connected: about a minute
    assert kernels.cull_interval <= 15  # ... checked often enough to keep to it
    assert kernels.cull_idle_timeout >= 600  # a page that connected survives a sleeping laptop
    assert not kernels.cull_connected  # never the kernel of an open tab


def test_a_teachers_voila_config_tunes_the_timeouts_but_keeps_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("voila")
    user = tmp_path / "user-config"
    user.mkdir()
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(user))
    monkeypatch.chdir(tmp_path)
    (user / "voila.json").write_text(
        json.dumps(
            {
                "ClassroomKernelManager": {"unconnected_timeout": 120, "max_kernels": 500},
                "VoilaConfiguration": {
                    "multi_kernel_manager_class": "jupyter_server.services.kernels."
                    "kernelmanager.AsyncMappingKernelManager"
                },
            }
        )
    )
    notebook = write_notebook(tmp_path / "nb.ipynb", "1")
    command, _ = cli.classroom.classroom_command(classroom(notebook), {})
    app = voila_app(command)
    from diffwidget.cli.classroom_kernels import ClassroomKernelManager

    assert app.voila_configuration.multi_kernel_manager_class is ClassroomKernelManager
    kernels = ClassroomKernelManager(config=app.config)
    assert kernels.unconnected_timeout == 120  # the teacher's choice
    assert kernels.max_kernels == 7  # the command line's cap
    assert kernels.cull_idle_timeout == 900  # the bundled default where the teacher is silent


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("10.0.0.5", False),
        ("classroom-pc", False),
    ],
)
def test_a_token_is_required_off_loopback_only(
    ip: str, loopback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    assert cli.classroom.is_loopback(ip) is loopback
    token = cli.classroom.choose_token(ip, None)
    assert (token is None) is loopback
    assert cli.classroom.choose_token(ip, False) is None  # --no-token
    forced = cli.classroom.choose_token(ip, True)  # --token
    assert forced is not None
    assert len(forced) >= 32  # 24 random bytes, URL-safe base64


def test_tokens_are_random_unless_the_user_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    tokens = {cli.classroom.choose_token("0.0.0.0", None) for _ in range(5)}
    assert len(tokens) == 5
    monkeypatch.setenv("JUPYTER_TOKEN", "kept-across-restarts")
    assert cli.classroom.choose_token("0.0.0.0", None) == "kept-across-restarts"


def test_the_token_reaches_voila_by_environment_not_command_line(tmp_path: Path) -> None:
    pytest.importorskip("voila")
    notebook = write_notebook(tmp_path / "nb.ipynb", "1")
    room = classroom(notebook, ip="0.0.0.0", token="s3cret-token", open_browser=True)
    command, env = cli.classroom.classroom_command(room, {"JUPYTER_TOKEN": "stale"})
    assert "--token" in command  # Voila reads JUPYTER_TOKEN only with this flag
    assert env["JUPYTER_TOKEN"] == "s3cret-token"
    assert not any("s3cret-token" in arg for arg in command)  # others can read `ps`
    assert "--no-browser" in command  # Voila would open the URL without the token
    command, env = cli.classroom.classroom_command(classroom(notebook), {"JUPYTER_TOKEN": "x"})
    assert "--token" not in command
    assert "JUPYTER_TOKEN" not in env


def test_classroom_urls_carry_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli.classroom.socket, "gethostname", lambda: "teacher-pc")
    monkeypatch.setattr(cli.classroom, "lan_address", lambda: "192.168.1.20")
    room = classroom(tmp_path / "nb.ipynb", ip="0.0.0.0", port=8866, token="abc")
    assert room.urls() == [
        "http://teacher-pc:8866/?token=abc",
        "http://192.168.1.20:8866/?token=abc",
    ]
    assert classroom(tmp_path / "nb.ipynb", ip="10.0.0.5", port=80).urls() == [
        "http://10.0.0.5:80/"
    ]
    assert classroom(tmp_path / "nb.ipynb", ip="::1", port=80).urls() == ["http://[::1]:80/"]


@pytest.mark.parametrize(
    ("available_mb", "students"),
    [(24_000, (24_000 - 1500) // 700), (8_000, 9), (2_000, 1), (500, 1), (None, 8)],
)
def test_default_cap_is_what_the_memory_holds(available_mb: float | None, students: int) -> None:
    assert cli.classroom.default_max_students(available_mb) == students


def test_available_memory_is_read_from_the_system() -> None:
    available = cli.classroom.available_memory_mb()
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo on this system")
    fields = {line.split(":")[0]: line.split()[1] for line in meminfo.read_text().splitlines()}
    assert available == pytest.approx(int(fields["MemAvailable"]) / 1024, rel=0.2)


def serve_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str], Any]]:
    """Record what ``diffwidget demo --classroom`` would serve, serving nothing."""
    pytest.importorskip("voila")
    calls: list[tuple[list[str], dict[str, str], Any]] = []

    def fake_serve(command: list[str], env: dict[str, str], **kwargs: Any) -> int:
        calls.append((command, env, kwargs.get("open_url")))
        return 0

    monkeypatch.setattr(cli.classroom, "serve", fake_serve)
    monkeypatch.setattr(cli.classroom, "available_memory_mb", lambda: 8_000.0)
    monkeypatch.delenv("JUPYTER_TOKEN", raising=False)
    return calls


def test_classroom_on_the_network_prints_a_url_with_a_token_and_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = serve_calls(monkeypatch)
    argv = ["demo", "--classroom", "--ip", "0.0.0.0", "--dir", str(tmp_path)]
    status, _, err = run(argv, capsys)
    assert status == cli.EXIT_OK
    ((command, env, open_url),) = calls
    token = env["JUPYTER_TOKEN"]
    assert f":8866/?token={token}" in err
    assert "at most 9 students" in err  # (8000 MB - 1500 MB reserved) // 700 MB
    assert "--ClassroomKernelManager.max_kernels=9" in command
    assert "warning" not in err
    url, host, port = open_url  # the teacher's browser gets the URL with the token
    assert (url, host, port) == (f"http://127.0.0.1:8866/?token={token}", "127.0.0.1", 8866)


def test_classroom_without_a_token_on_the_network_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = serve_calls(monkeypatch)
    argv = ["demo", "--classroom", "--ip", "0.0.0.0", "--no-token", "--dir", str(tmp_path)]
    status, _, err = run([*argv, "--max-students", "3"], capsys)
    assert status == cli.EXIT_OK
    ((command, env, _),) = calls
    assert "--token" not in command
    assert "JUPYTER_TOKEN" not in env
    assert "warning: serving on 0.0.0.0 without a token" in err
    assert "--ClassroomKernelManager.max_kernels=3" in command
    assert "?token=" not in err


def test_classroom_on_loopback_needs_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = serve_calls(monkeypatch)
    status, _, err = run(["demo", "--classroom", "--no-browser", "--dir", str(tmp_path)], capsys)
    assert status == cli.EXIT_OK
    ((command, _, open_url),) = calls
    assert "--token" not in command
    assert open_url is None
    assert "    http://127.0.0.1:8866/\n" in err
    assert "warning" not in err


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--classroom", "--max-students", "0"], "--max-students must be at least 1"),
        (["--max-students", "5"], "apply to --classroom only"),
        (["--no-token"], "apply to --classroom only"),
        (["--check", "--max-students", "5"], "apply to --classroom only"),
    ],
)
def test_classroom_options_are_checked(
    options: list[str],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = serve_calls(monkeypatch)

    def fake_serve(*args: Any, **_: Any) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(cli.demo, "serve", fake_serve)
    status, _, err = run(["demo", "--dir", str(tmp_path), *options], capsys)
    assert status == cli.EXIT_USAGE
    assert fragment in err
    assert calls == []
