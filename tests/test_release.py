"""Release files: licence, citation, changelog, one version, and the source build's Node check."""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else None


def pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_the_metadata() -> None:
    project = pyproject()["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text  # the third clause


def test_version_has_one_home() -> None:
    from diffwidget import __version__

    config = pyproject()
    assert "version" not in config["project"]
    assert config["project"]["dynamic"] == ["version"]
    assert config["tool"]["hatch"]["version"]["path"] == "diffwidget/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", __version__)
    # Other files name no version of their own.
    assert not re.search(r"^version:", (ROOT / "CITATION.cff").read_text(), re.MULTILINE)
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_citation_file_cites_the_project_and_the_paper() -> None:
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors"):
        assert citation[key], key
    assert citation["type"] == "software"
    assert citation["license"] == pyproject()["project"]["license"]
    (paper,) = citation["references"]
    assert paper["journal"] == "Expert Systems with Applications"
    assert [a["family-names"] for a in paper["authors"]] == ["Park", "Ju", "Lee"]
    assert "2402.10404" in paper["identifiers"][0]["value"]
    readme = (ROOT / "README.md").read_text()
    assert "arXiv:2402.10404" in readme
    assert "CITATION.cff" in readme


def test_project_urls_are_urls() -> None:
    # PyPI accepts only http(s) URLs; a file path would fail at upload time.
    for label, url in pyproject()["project"]["urls"].items():
        assert url.startswith("https://"), label


def test_build_extras_and_hook_order() -> None:
    config = pyproject()
    assert any(req.startswith("build") for req in config["project"]["optional-dependencies"]["dev"])
    hooks = list(config["tool"]["hatch"]["build"]["hooks"])
    assert hooks.index("custom") < hooks.index("jupyter-builder")  # the check runs first


# ------------------------------------------------------------------ the Node.js check
@pytest.fixture
def hook() -> SimpleNamespace:
    pytest.importorskip("hatchling")
    sys.path.insert(0, str(ROOT))
    try:
        import hatch_build
    finally:
        sys.path.remove(str(ROOT))
    return SimpleNamespace(module=hatch_build)


def fake_program(folder: Path, name: str, output: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho {output}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def source_tree(root: Path, *, built: bool) -> Path:
    if built:
        static = root / "diffwidget" / "widget" / "static"
        static.mkdir(parents=True)
        for name in ("widget.js", "live.js", "ort-wasm-simd-threaded.wasm"):
            (static / name).write_text("export default {};\n")
    return root


def test_a_built_front_end_needs_no_node(
    hook: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    assert hook.module.node_problem(source_tree(tmp_path / "src", built=True)) is None


def test_no_node_says_what_is_needed(
    hook: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    root = source_tree(tmp_path / "src", built=False)
    assert hook.module.node_problem(root) == "node and npm not found on PATH"
    with pytest.raises(SystemExit) as info:
        hook.module.CustomBuildHook.initialize(SimpleNamespace(root=str(root)), "standard", {})
    message = str(info.value.code)
    assert "Node.js >= 18" in message
    assert "widget.js is missing" in message
    assert "wheel or sdist needs no Node.js" in message


@pytest.mark.parametrize(
    ("version", "problem"), [("v16.20.2", "is version 16"), ("garbage", "unknown version")]
)
def test_old_node_says_what_is_needed(
    version: str,
    problem: str,
    hook: SimpleNamespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_program(tmp_path, "node", version)
    fake_program(tmp_path, "npm", "10.0.0")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = hook.module.node_problem(source_tree(tmp_path / "src", built=False))
    assert problem in found
    assert "Node.js >= 18" in found


def test_recent_node_builds(
    hook: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_program(tmp_path, "node", "v20.20.2")
    fake_program(tmp_path, "npm", "10.0.0")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hook.module.node_problem(source_tree(tmp_path / "src", built=False)) is None


def test_a_front_end_without_the_live_bundle_still_needs_node(
    hook: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    root = source_tree(tmp_path / "src", built=True)
    (root / "diffwidget" / "widget" / "static" / "live.js").unlink()
    assert hook.module.node_problem(root) == "node and npm not found on PATH"
