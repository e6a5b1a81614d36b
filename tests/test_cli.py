"""The ``diffwidget`` command: help, argument errors, notebook look-up, headless runs, export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

from diffwidget import cli

GOOD_PROMPT = "a large red circle on the left"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def write_notebook(path: Path, *sources: str) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)
    return path


# ------------------------------------------------------------------------------ help
def test_help_names_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "demo" in out
    assert "export" in out
    assert "diffwidget export" in out  # the example line


@pytest.mark.parametrize(
    ("command", "expected"),
    [("demo", "--classroom"), ("demo", "--check"), ("export", "--overlay"), ("export", "--model")],
)
def test_subcommand_help_documents_options(
    command: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert expected in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "demo" in capsys.readouterr().err


# ------------------------------------------------------------------------------ export errors
@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("", "the prompt is empty"),
        ("   ", "the prompt is empty"),
        ("a red dog on the left", "no word for 'dog'"),
        ("A red circle on the sofa.", "no word for 'sofa'"),
        (" ".join(["a red circle"] * 6), "at most"),
    ],
)
def test_export_rejects_bad_prompts(
    prompt: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(["export", prompt, "-o", str(tmp_path / "x.html")], capsys)
    assert status == cli.EXIT_USAGE
    assert fragment in err
    assert not (tmp_path / "x.html").exists()


def test_unknown_word_error_lists_the_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffwidget.models.scenes import VOCABULARY

    _, _, err = run(["export", "a purple dog", "-o", str(tmp_path / "x.html")], capsys)
    assert all(word in err for word in VOCABULARY)
    assert "--model" in err  # the way out for prompts outside the embedded model's world


def test_caption_outside_the_grammar_is_a_note_not_an_error() -> None:
    assert cli.export.check_prompt(GOOD_PROMPT) == []
    assert (
        cli.export.check_prompt("A red circle, on the left.") == []
    )  # read as the tokenizer reads it
    notes = cli.export.check_prompt("a red circle")  # known words, but no position: not the grammar
    assert len(notes) == 1
    assert "grammar" in notes[0]


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("x.png", "must be an .html file"),
        ("missing/x.html", "does not exist"),
        ("folder.html", "is a folder"),
    ],
)
def test_export_rejects_bad_outputs(
    output: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "folder.html").mkdir()
    status, _, err = run(["export", GOOD_PROMPT, "-o", str(tmp_path / output)], capsys)
    assert status == cli.EXIT_USAGE
    assert fragment in err


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--steps", "0"], "--steps must be between 1"),
        (["--steps", "5000"], "--steps must be between 1"),
        (["--seed", "-1"], "--seed must be zero or positive"),
        (["--guidance", "0.5"], "--guidance must be above 1"),
        (["--steps", "20", "--step", "20"], "loop index in 0..19"),
        (["--overlay", "df_rise"], "--overlay needs --step"),
    ],
)
def test_export_rejects_bad_numbers(
    options: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", GOOD_PROMPT, "-o", str(tmp_path / "x.html"), *options]
    status, _, err = run(argv, capsys)
    assert status == cli.EXIT_USAGE
    assert fragment in err


def test_export_rejects_unknown_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", GOOD_PROMPT, "--overlay", "gradcam", "--step", "1"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "df_rise" in capsys.readouterr().err  # the valid choices are named


def test_export_rejects_a_model_folder_without_a_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "a photo", "-o", str(tmp_path / "x.html"), "--model", str(tmp_path)]
    status, _, err = run(argv, capsys)
    assert status == cli.EXIT_USAGE
    assert "model_index.json" in err
    assert "save_pretrained" in err


# ------------------------------------------------------------------------------ demo
def test_bundled_notebooks_are_numbered_and_include_the_quickstart() -> None:
    names = [path.name for path in cli.common.bundled_notebooks()]
    assert names[0] == cli.common.QUICKSTART
    assert [name[:2] for name in names] == [f"{i:02d}" for i in range(1, len(names) + 1)]


def test_resolve_notebook_by_number_name_and_path(tmp_path: Path) -> None:
    quickstart = cli.common.notebooks_dir() / cli.common.QUICKSTART
    assert cli.common.resolve_notebook(None) == quickstart
    assert cli.common.resolve_notebook("01") == quickstart
    assert cli.common.resolve_notebook("01_quickstart") == quickstart
    own = write_notebook(tmp_path / "mine.ipynb", "1 + 1")
    assert cli.common.resolve_notebook(str(own)) == own.resolve()


@pytest.mark.parametrize(
    ("name", "fragment"), [("99", "choose one of: 01_quickstart"), ("nope.ipynb", "does not exist")]
)
def test_demo_rejects_unknown_notebooks(
    name: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(["demo", "--check", "--notebook", name], capsys)
    assert status == cli.EXIT_USAGE
    assert fragment in err


def test_check_and_classroom_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--check", "--classroom"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "not allowed with" in capsys.readouterr().err


def test_demo_copies_the_notebook_and_keeps_an_edited_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []

    def fake_serve(command: list[str], env: dict[str, str], **_: Any) -> int:
        calls.append(command)
        return 0

    monkeypatch.setattr(cli.demo, "serve", fake_serve)
    workdir = tmp_path / "work"
    status, _, _ = run(["demo", "--dir", str(workdir), "--no-browser", "--port", "9999"], capsys)
    copy = workdir / cli.common.QUICKSTART
    assert status == 0
    assert copy.read_bytes() == (cli.common.notebooks_dir() / cli.common.QUICKSTART).read_bytes()
    assert calls[0][:4] == [sys.executable, "-m", "jupyterlab", str(copy)]
    assert f"--ServerApp.root_dir={workdir.resolve()}" in calls[0]
    assert "--ServerApp.port=9999" in calls[0]
    assert "--no-browser" in calls[0]

    copy.write_text(copy.read_text().replace("Quickstart", "My edited quickstart"))
    run(["demo", "--dir", str(workdir)], capsys)
    assert "My edited quickstart" in copy.read_text()  # never overwritten


def hide_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``find_spec`` report ``names`` as not installed."""
    real = cli.common.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in names else real(name, *args)

    monkeypatch.setattr(cli.common.importlib.util, "find_spec", find_spec)


def test_demo_without_jupyterlab_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hide_modules(monkeypatch, "jupyterlab", "voila")
    root = Path(cli.__file__).resolve().parents[2]
    status, _, err = run(["demo", "--dir", str(tmp_path)], capsys)
    assert status == cli.EXIT_USAGE
    assert f"jupyterlab is not installed for {sys.executable}" in err
    assert f'{sys.executable} -m pip install -e "{root}[demo]"' in err
    status, _, err = run(["demo", "--dir", str(tmp_path), "--classroom"], capsys)
    assert status == cli.EXIT_USAGE
    assert f'-e "{root}[classroom]"' in err


def test_check_without_the_notebook_tools_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("nbclient", "nbclient.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import nbclient` fail
    status, _, err = run(["demo", "--check"], capsys)
    assert status == cli.EXIT_USAGE
    assert "-m pip install -e" in err
    assert "[demo]" in err


def test_install_hint_in_a_clone_names_the_clone() -> None:
    root = Path(cli.__file__).resolve().parents[2]
    assert cli.common.source_checkout() == root
    assert (
        cli.common.install_hint("classroom")
        == f'{sys.executable} -m pip install -e "{root}[classroom]"'
    )
    pyproject = (root / "pyproject.toml").read_text()
    for extra in ("demo", "classroom"):  # the hints name extras that exist
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra


def test_install_hint_from_a_wheel_lists_the_extra_requirements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Installed from a wheel there is no clone, and "diffwidget[...]" is on no index yet."""
    monkeypatch.setattr(cli.common, "source_checkout", lambda: None)
    requires = [
        "torch>=2.2",
        "voila<0.6,>=0.5.13; extra == 'classroom'",
        'jupyterlab>=4; extra == "demo"',
        "pytest>=8; extra == 'test'",
    ]
    monkeypatch.setattr(cli.common.importlib.metadata, "requires", lambda name: requires)
    assert (
        cli.common.install_hint("classroom")
        == f'{sys.executable} -m pip install "voila<0.6,>=0.5.13"'
    )
    assert cli.common.install_hint("demo") == f'{sys.executable} -m pip install "jupyterlab>=4"'


STUB_MAIN = """
import json, os, sys
with open(os.environ["STUB_RECORD"], "w") as f:
    json.dump({"module": __spec__.parent, "argv": sys.argv[1:], "executable": sys.executable,
               "omp": os.environ.get("OMP_NUM_THREADS")}, f)
"""


@pytest.mark.parametrize(("options", "module"), [([], "jupyterlab"), (["--classroom"], "voila")])
def test_demo_starts_programs_through_this_interpreter_not_path(
    options: list[str], module: str, tmp_path: Path
) -> None:
    """A venv's diffwidget, run without activating the venv, must not need PATH."""
    stubs, empty_bin = tmp_path / "stubs", tmp_path / "bin"
    (stubs / module).mkdir(parents=True)
    (stubs / module / "__init__.py").write_text("")
    (stubs / module / "__main__.py").write_text(STUB_MAIN)
    empty_bin.mkdir()
    record = tmp_path / "record.json"
    root = Path(cli.__file__).resolve().parents[2]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    env.update(
        PATH=str(empty_bin),  # neither jupyter-lab nor voila (nor anything else) on PATH
        PYTHONPATH=os.pathsep.join([str(stubs), str(root)]),
        STUB_RECORD=str(record),
        DIFFWIDGET_THREADS="3",
    )
    argv = [sys.executable, "-m", "diffwidget.cli", "demo", "--no-browser", *options]
    result = subprocess.run(
        [*argv, "--dir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    started = json.loads(record.read_text())
    assert started["module"] == module
    assert Path(started["executable"]).resolve() == Path(sys.executable).resolve()
    assert str(tmp_path / "work" / cli.common.QUICKSTART) in started["argv"]
    assert "--no-browser" in started["argv"]
    assert started["omp"] == "3"  # DIFFWIDGET_THREADS reaches the notebook kernels
    assert "DIFFWIDGET_THREADS=N" in result.stderr  # and the user is told how to change it


def test_kernels_keep_a_thread_count_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("DIFFWIDGET_THREADS", "2")
    assert cli.demo._kernel_env()["OMP_NUM_THREADS"] == "4"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli.demo._kernel_env()["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("DIFFWIDGET_THREADS")
    assert cli.demo._kernel_env()["OMP_NUM_THREADS"] == "1"


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


def test_check_runs_a_notebook_in_a_temporary_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notebook = write_notebook(
        tmp_path / "ok.ipynb",
        "import diffwidget, pathlib",
        "pathlib.Path('written.txt').write_text(diffwidget.__version__)",
    )
    status, out, _ = run(["demo", "--check", "--notebook", str(notebook)], capsys)
    assert status == cli.EXIT_OK
    assert "ran without errors" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.ipynb"]  # nothing left behind


def test_check_reports_the_failing_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notebook = write_notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('boom 4711')")
    status, _, err = run(["demo", "--check", "--notebook", str(notebook)], capsys)
    assert status == cli.EXIT_FAILED
    assert "bad.ipynb failed" in err
    assert "boom 4711" in err


# ------------------------------------------------------------------------------ export
@pytest.fixture
def random_weight_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded architecture with random weights in place of the trained model."""
    from diffwidget.models.architecture import build_demo_pipeline

    def load(model: str | None) -> Any:
        assert model is None
        return build_demo_pipeline(seed=0)

    monkeypatch.setattr(cli.export, "load_pipeline", load)


@pytest.mark.usefixtures("random_weight_model")
def test_export_writes_a_standalone_explorer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "explorer.html"
    argv = ["export", GOOD_PROMPT, "-o", str(output), "--steps", "4", "--overlay", "df_cam"]
    status, out, err = run([*argv, "--step", "2", "--preview-from", "cond"], capsys)
    assert status == cli.EXIT_OK, err
    html = output.read_text()
    assert "wrote" in out
    assert str(output) in out
    assert GOOD_PROMPT in html
    assert "df_cam" in html  # the precomputed overlay travels with the page
    assert "conditional CFG half" in html  # the caption names the previews' source
    assert "denoising" in err  # the progress bar
    assert "<script" in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing fetched online
