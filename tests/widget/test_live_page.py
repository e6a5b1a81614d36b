"""The live page's files: what they embed, what they refuse, and the CLI that writes them.

What the page does in a browser is tested in ``tests/browser/test_browser_live.py``.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from diffwidget import cli
from diffwidget.models.live_manifest import load_live_manifest
from diffwidget.widget import live

pytestmark = pytest.mark.skipif(
    not live.LIVE_JS.is_file(), reason="needs the built front end (npm run build in js/)"
)
#: The page's download budget (gzip), from the live model's goals.
GZIP_BUDGET = 8_000_000
CAPTION = "a small blue square above a yellow triangle"


def _config(page: str) -> dict:
    match = re.search(r'id="diffwidget-live-config">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_the_single_file_embeds_every_asset_byte_for_byte(tmp_path: Path) -> None:
    path = live.write_live_html(tmp_path / "page.html", prompt="a red circle on the left")
    page = path.read_text()
    manifest = load_live_manifest()
    embedded = dict(
        re.findall(r'data-file="([^"]+)" data-encoding="gzip">([A-Za-z0-9+/=]+)</script>', page)
    )
    names = [f"unet/{g.file}" for g in manifest.graphs]
    assert sorted(embedded) == sorted([*names, live.WASM_FILE])
    for graph, name in zip(manifest.graphs, names, strict=True):
        raw = gzip.decompress(base64.b64decode(embedded[name]))
        assert raw == (live.live_folder("unet") / graph.file).read_bytes()
    config = _config(page)
    assert config["prompt"] == "a red circle on the left"
    [model] = config["models"]
    assert model["manifest"]["fingerprint"] == manifest.fingerprint
    assert "ThirdPartyNotices.txt" in page
    assert "MIT License" in page
    # No address outside the page: nothing is fetched.
    assert not re.search(r"https?://(?!www\.w3\.org)", page.split('id="diffwidget-live-config"')[0])


def test_the_page_fits_the_download_budget(tmp_path: Path) -> None:
    path = live.write_live_html(tmp_path / "page.html")
    assert len(gzip.compress(path.read_bytes(), 6)) <= GZIP_BUDGET
    assert "transformer.onnx" not in path.read_text()  # the DiT only where a page asks for it


def _decoded(array: dict) -> np.ndarray:
    """A first-run array as the page decodes it (gzip, delta rows, scale)."""
    raw = gzip.decompress(base64.b64decode(array["data"]))
    if array["encoding"] == "float16":
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(array["shape"])
    rows = np.frombuffer(raw, np.uint8).reshape(array["shape"])
    if array["delta"]:
        rows = np.cumsum(rows, axis=0, dtype=np.uint64) % 256
    return rows.astype(np.float64) * array["scale"]


def test_the_embedded_first_image_is_the_trace_of_the_default_caption(tmp_path: Path) -> None:
    import diffwidget

    path = live.write_live_html(tmp_path / "page.html", prompt=CAPTION, first_image=True)
    [first] = _config(path.read_text())["first"]
    assert (first["model"], first["prompt"], first["seed"]) == ("unet", CAPTION, 0)
    reference = diffwidget.trace(diffwidget.load_demo_pipeline(), CAPTION, seed=0)
    # The page's defaults are the manifest's, which trace() uses when given none.
    assert first["steps"] == len(reference.timesteps)
    assert first["guidance"] == reference.guidance_scale
    assert first["timesteps"] == [int(t) for t in reference.timesteps]
    image = _decoded(first["image"]).reshape(reference.image.shape)
    assert np.abs(image - reference.image).max() <= 1
    previews = _decoded(first["previews"]).reshape(reference.previews.shape)
    assert np.abs(previews - reference.previews).max() <= 1
    noise = _decoded(first["noise_pred"]).reshape(reference.noise_pred.shape)
    assert np.abs(noise - reference.noise_pred).max() <= 2e-3 * np.abs(reference.noise_pred).max()
    for layer, maps in reference.attention.items():
        got = _decoded(first["attention"][layer]).reshape(maps.shape)
        # 8 bits: half a level of the layer's max / 255, plus the export's own 1e-3.
        assert np.abs(got - maps).max() <= 0.5 * first["attention"][layer]["scale"] + 1e-3
    plain = live.write_live_html(tmp_path / "plain.html", first_image=False)
    assert _config(plain.read_text())["first"] == []


def test_the_first_image_needs_onnxruntime_only_when_asked_for(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if absent
    assert live.first_runs("a red circle", ("unet",), None) == ()
    with pytest.raises(ImportError, match="live-export"):
        live.first_runs("a red circle", ("unet",), True)


def test_a_page_with_both_models_ships_the_shared_decoders_once(tmp_path: Path) -> None:
    path = live.write_live_html(tmp_path / "both.html", models=("unet", "dit"))
    page = path.read_text()
    embedded = re.findall(r'data-file="([^"]+)" data-encoding="gzip">', page)
    unet, dit = load_live_manifest("unet"), load_live_manifest("dit")
    shared = {g.sha256 for g in unet.graphs} & {g.sha256 for g in dit.graphs}
    assert shared, "the DiT's decoders are the UNet's (one VAE, one preview decoder)"
    assert len(embedded) == len(unet.graphs) + len(dit.graphs) - len(shared) + 1
    assert "dit/transformer.onnx" in embedded
    assert "dit/vae.onnx" not in embedded
    config = _config(page)
    assert [m["manifest"]["model"] for m in config["models"]] == ["unet", "dit"]
    dit_facts = config["models"][1]["facts"]
    assert dit_facts["attention_kind"] == "Joint-attention"
    assert config["models"][0]["facts"]["attention_kind"] == "Cross-attention"
    with pytest.raises(ValueError, match="at most once"):
        live.live_config(models=("dit", "dit"))
    with pytest.raises(ValueError, match="at most once"):
        live.live_config(models=("sdxl",))


def test_a_caption_cannot_end_the_script_element(tmp_path: Path) -> None:
    evil = "</script><script>alert(1)</script><!--"
    page = live.write_live_html(tmp_path / "p.html", prompt=evil).read_text()
    assert "<script>alert(1)" not in page
    assert _config(page)["prompt"] == evil
    assert "&lt;/script&gt;" in page.split("<title>")[1].split("</title>")[0]


def test_captions_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than"):
        live.write_live_html(tmp_path / "p.html", prompt="a " * live.MAX_CAPTION_CHARS)
    with pytest.raises(TypeError, match="string"):
        live.live_config(prompt=3)  # type: ignore[arg-type]


def test_the_folder_holds_the_page_and_its_files(tmp_path: Path) -> None:
    index = live.write_live_folder(tmp_path / "site", compare="a blue square at the top")
    names = {p.relative_to(index.parent).as_posix() for p in index.parent.rglob("*")}
    manifest = load_live_manifest()
    graphs = {f"unet/{g.file}" for g in manifest.graphs}
    assert graphs | {"index.html", "live.js", live.WASM_FILE, "unet/manifest.json"} <= names
    assert not any(name.startswith("dit") for name in names)
    assert (index.parent / "licenses" / "onnxruntime-web" / "ThirdPartyNotices.txt").is_file()
    page = index.read_text()
    assert 'from "./live.js"' in page
    assert "data-file=" not in page  # assets are fetched from the folder, not embedded
    assert _config(page)["compare"] == "a blue square at the top"


def test_the_runtime_version_is_the_pinned_one() -> None:
    package = json.loads((Path(__file__).resolve().parents[2] / "js" / "package.json").read_text())
    assert package["dependencies"]["onnxruntime-web"] == live.runtime_version()


def test_cli_writes_the_live_file_and_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "live.html"
    assert cli.main(["export", "--live", "a small blue square at the top", "-o", str(out)]) == 0
    assert _config(out.read_text())["prompt"] == "a small blue square at the top"
    assert cli.main(["export", "--live", "--folder", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "index.html").is_file()
    assert cli.main(["export", "--live", "--folder", str(tmp_path / "site")]) == 2
    assert "--force" in capsys.readouterr().err
    both = tmp_path / "both.html"
    assert (
        cli.main(["export", "--live", "a red circle", "--model", "unet", "dit", "-o", str(both)])
        == 0
    )
    assert [m["label"] for m in _config(both.read_text())["models"]] == [
        live.MODEL_LABELS["unet"],
        live.MODEL_LABELS["dit"],
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--live", "--model", "sdxl"], "--model takes unet and/or dit"),
        (["export", "--live", "--model", "dit", "dit"], "--model takes unet and/or dit"),
        (["export", "a red circle", "--model", "unet", "dit"], "one model to trace"),
        (["export", "--live", "--overlay", "df_rise", "--step", "1"], "need the kernel"),
        (["export", "--folder", "x"], "belong to --live"),
        (["export"], "pass a caption"),
    ],
)
def test_cli_live_usage_errors(argv, message, capsys) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_main_widget_bundle_holds_none_of_the_live_runtime() -> None:
    from diffwidget.widget.model import ESM_PATH

    widget = ESM_PATH.read_text()
    assert "InferenceSession" not in widget
    assert "wasm-unsafe-eval" not in widget
    assert "InferenceSession" in live.LIVE_JS.read_text()
