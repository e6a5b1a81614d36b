"""Release files: licence, citation, changelog, one version, and the source build's Node check."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

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


# ------------------------------------------------------------------ what the tests import
#: Imported only where they exist: Colab's own module (the Colab notebook looks for it
#: first) and the standard library's ``tomllib`` from Python 3.11 (tests skip before).
NOT_DISTRIBUTIONS = frozenset({"google", "tomllib"})
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
IMPORTORSKIP = re.compile(r"importorskip\(\s*[\"']([\w.]+)[\"']")
#: `make test` installs this extra (and with it every extra it names).
TEST_EXTRA = "dev"


def canonical(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(extra: str) -> set[str]:
    """The distributions diffwidget's dependencies and ``extra`` name, extras expanded."""
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    names: set[str] = set()
    seen: set[str] = set()
    todo = [*project["dependencies"], f"diffwidget[{extra}]"]
    while todo:
        match = REQUIREMENT.match(todo.pop())
        assert match is not None
        if canonical(match[1]) != "diffwidget":
            names.add(canonical(match[1]))
            continue
        for name in (part.strip() for part in (match[2] or "").split(",")):
            if name and name not in seen:
                seen.add(name)
                todo.extend(optional[name])
    return names


def imported_modules(source: str) -> set[str]:
    """Top-level modules a Python source imports anywhere (functions too, importorskip too)."""
    modules = {match.split(".")[0] for match in IMPORTORSKIP.findall(source)}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def notebook_code(path: Path) -> str:
    """A notebook's code cells as one Python source, shell and magic lines dropped."""
    cells = json.loads(path.read_text())["cells"]
    lines = [
        line
        for cell in cells
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if not line.lstrip().startswith(("!", "%"))
    ]
    return "\n".join(lines)


def suite_sources() -> dict[str, str]:
    """What the test suite runs: tests, the notebooks (nbval), the bench modules tests use."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "tests").rglob("*.py")}
    sources |= {
        str(p.relative_to(ROOT)): notebook_code(p) for p in (ROOT / "notebooks").glob("*.ipynb")
    }
    used = set().union(*(imported_modules(source) for source in sources.values()))
    for path in (ROOT / "bench").glob("*.py"):
        if path.stem in used or f"bench.{path.stem}" in "".join(sources.values()):
            sources[str(path.relative_to(ROOT))] = path.read_text()
    return sources


def test_every_third_party_module_the_tests_import_is_in_an_extra() -> None:
    """A module installed by hand, and named by no extra, fails on a fresh machine."""
    local = {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*.py")}
    local |= {"diffwidget", "tests", "bench", "hatch_build"}
    declared = declared_distributions(TEST_EXTRA)
    providers = importlib.metadata.packages_distributions()
    missing: dict[str, str] = {}
    for path, source in sorted(suite_sources().items()):
        for module in sorted(imported_modules(source)):
            if module in sys.stdlib_module_names or module in local | NOT_DISTRIBUTIONS:
                continue
            found = {canonical(name) for name in providers.get(module, [])}
            if not found & declared:
                what = ", ".join(sorted(found)) or "not installed here"
                missing.setdefault(module, f"{module} ({what}), imported by {path}")
    assert not missing, "add to an extra in pyproject.toml: " + "; ".join(missing.values())


def test_declared_distributions_follow_extras() -> None:
    declared = declared_distributions(TEST_EXTRA)
    assert {"torch", "pytest", "accelerate", "build"} <= declared  # core, test, runs, dev
    assert "diffwidget" not in declared
    assert "jupyterlab" in declared_distributions("demo")
    assert "pytest" not in declared_distributions("demo")


# ------------------------------------------------------------------ the Colab notebook
COLAB = ROOT / "notebooks" / "06_colab_walkthrough.ipynb"
WHEEL_URL_LINE = re.compile(r"^WHEEL_URL = .*$", re.MULTILINE)


def run_colab_install_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, wheel_url: str = "", pip_fails: bool = False
) -> tuple[list[list[str]], list[str]]:
    """Run the notebook's install cell as on Colab without diffwidget: pip calls, widget calls."""
    cells = json.loads(COLAB.read_text())["cells"]
    source = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    assert WHEEL_URL_LINE.search(source), "the cell sets WHEEL_URL on a line of its own"
    source = WHEEL_URL_LINE.sub(f"WHEEL_URL = {wheel_url!r}", source)
    pip_calls: list[list[str]] = []
    widget_calls: list[str] = []

    def fake_run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        pip_calls.append(argv)
        return subprocess.CompletedProcess(argv, 1 if pip_fails else 0, "", "ERROR: 404 for x")

    colab = ModuleType("google.colab")
    colab.output = SimpleNamespace(  # type: ignore[attr-defined]
        enable_custom_widget_manager=lambda: widget_calls.append("enabled")
    )
    google = ModuleType("google")
    google.colab = colab  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "diffwidget" else real_find_spec(name, *args),
    )
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    exec(compile(source, str(COLAB), "exec"), {})
    return pip_calls, widget_calls


def test_colab_installs_an_uploaded_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "diffwidget-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    pip_calls, widget_calls = run_colab_install_cell(
        tmp_path, monkeypatch, wheel_url="https://example.org/other.whl"
    )
    assert pip_calls == [[sys.executable, "-m", "pip", "install", "-q", str(wheel)]]
    assert widget_calls == ["enabled"]


def test_colab_installs_a_wheel_from_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "https://example.org/diffwidget-0.1.0-py3-none-any.whl"
    pip_calls, _ = run_colab_install_cell(tmp_path, monkeypatch, wheel_url=url)
    assert pip_calls == [[sys.executable, "-m", "pip", "install", "-q", url]]


def test_colab_without_a_wheel_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never `pip install diffwidget` from an index that has no release (or someone else's)."""
    with pytest.raises(RuntimeError, match="make dist") as info:
        run_colab_install_cell(tmp_path, monkeypatch)
    assert "WHEEL_URL" in str(info.value)
    assert "file panel" in str(info.value)


def test_colab_reports_what_pip_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://example.org/missing.whl"
    with pytest.raises(RuntimeError, match="404") as info:
        run_colab_install_cell(tmp_path, monkeypatch, wheel_url=url, pip_fails=True)
    assert url in str(info.value)
    assert "make dist" in str(info.value)


def test_release_steps_have_one_home() -> None:
    steps = (ROOT / "RELEASING.md").read_text()
    for step in ("make dist", "make dist-check", "twine check", "twine upload", ".ci/run"):
        assert step in steps, step
    assert "RELEASING.md" in (ROOT / "README.md").read_text()
    assert "RELEASING.md" in (ROOT / "Makefile").read_text()
    assert "RELEASING.md" in notebook_code(COLAB) + COLAB.read_text()
