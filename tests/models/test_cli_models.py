"""``diffwidget demo --model`` and ``diffwidget export --model``: the embedded UNet or DiT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest

from diffwidget import cli
from diffwidget.models.loader import DEMO_MODEL_ENV, DIT_DIR, demo_weights_available


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_both_commands_document_the_model_option(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("demo", "export"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "dit" in capsys.readouterr().out


def test_demo_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--model", "vit", "--check"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "'unet', 'dit'" in capsys.readouterr().err


def test_demo_check_runs_the_notebook_with_the_chosen_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(f"import os\nassert os.environ[{DEMO_MODEL_ENV!r}] == 'dit'")
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    path = tmp_path / "model.ipynb"
    nbformat.write(notebook, path)
    status, out, err = run(["demo", "--check", "--model", "dit", "--notebook", str(path)], capsys)
    assert status == cli.EXIT_OK, err
    assert "ran without errors" in out
    assert cli.demo._kernel_env()[DEMO_MODEL_ENV] == "unet"  # the default, whatever the shell says


def test_export_loads_the_named_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []

    def load(model: str = "unet", **kwargs: Any) -> str:
        asked.append(model)
        return f"pipeline {model}"

    monkeypatch.setattr("diffwidget.models.loader.load_demo_pipeline", load)
    assert cli.common.load_pipeline("dit") == "pipeline dit"
    assert cli.common.load_pipeline("unet") == "pipeline unet"
    assert cli.common.load_pipeline(None) == "pipeline unet"
    assert asked == ["dit", "unet", "unet"]


def test_export_checks_prompts_of_the_dit_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(
        ["export", "a cat on a sofa", "--model", "dit", "-o", str(tmp_path / "x.html")], capsys
    )
    assert status == cli.EXIT_USAGE
    assert "no word for 'cat', 'sofa'" in err


@pytest.mark.skipif(not demo_weights_available(DIT_DIR), reason="no shipped DiT weights")
def test_export_the_dit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import diffwidget

    pipe = diffwidget.load_demo_pipeline("dit")
    try:
        diffwidget.trace(pipe, "a red circle", num_inference_steps=1)
    except TypeError as error:
        pytest.skip(f"diffwidget.trace cannot trace the SD3 pipeline yet: {error}")
    output = tmp_path / "dit.html"
    argv = ["export", "A large red circle, on the left.", "--model", "dit", "-o", str(output)]
    status, out, err = run([*argv, "--steps", "4"], capsys)
    assert status == cli.EXIT_OK, err
    assert "wrote" in out
    assert "<script" in output.read_text()
