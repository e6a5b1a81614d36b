"""The ``diffwidget`` command: help, argument errors, notebook look-up, headless runs, export."""

from __future__ import annotations

import json
import os
import re
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
