"""The live page: the embedded model generating in the reader's browser (no kernel, no server).

Two forms of one page (both built from the exported graphs in ``diffwidget/models/live`` and
the lazily loaded bundle ``static/live.js`` with onnxruntime-web's WebAssembly binary):

* :func:`write_live_html`: one offline HTML file with every asset embedded (base64), which
  works opened from ``file://`` and fetches nothing;
* :func:`write_live_folder`: ``index.html`` beside its assets, for any static web host (a
  course page); the page fetches only files of its own folder.

The page draws the explorer's own views on state its JavaScript runtime builds
(``js/src/live``); what the Python side owns (colour-scale texts, the explorer's function
words, the attention normalisation text) travels in :class:`LivePageConfig`. Text from the
user (captions) reaches the page only inside JSON made script-safe
(:func:`~diffwidget.widget.export.script_safe_json`) and is set as text by the page.

Examples
--------
>>> path = write_live_html("live.html", prompt="a large red circle on the left")  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffwidget._markup import Markup, base64_text, escape, markup_join, safe_html
from diffwidget.explain.attention import PREFERRED_RESOLUTION
from diffwidget.models.live_manifest import (
    MANIFEST_FILE,
    LiveManifest,
    live_folder,
    load_live_manifest,
)
from diffwidget.models.scenes import EXAMPLE_CAPTIONS
from diffwidget.tracing.trace import NORMALISATION_TEXT
from diffwidget.widget.export import script_safe_json
from diffwidget.widget.model import STATIC

LIVE_JS = STATIC / "live.js"
WASM_FILE = "ort-wasm-simd-threaded.wasm"
RUNTIME_FILE = STATIC / "live_runtime.json"
LICENCE_DIR = STATIC / "licenses" / "onnxruntime-web"
LICENCE_FILES = ("LICENSE", "ThirdPartyNotices.txt")
GZIP_LEVEL = 9
#: Longest caption accepted for the page (the model reads 14 words; the box holds more).
MAX_CAPTION_CHARS = 500

# The loaders and the asset tags are markup this module writes: Markup, never data.
_LOADER_EMBEDDED = Markup("""\
const text = (id) => document.getElementById(id).textContent.trim();
const bytes = Uint8Array.from(atob(text("diffwidget-live-module")), (c) => c.charCodeAt(0));
const url = URL.createObjectURL(new Blob([bytes], { type: "text/javascript" }));
const live = await import(url);
URL.revokeObjectURL(url);
window.diffwidgetLiveModule = live;
live.start(document.getElementById("diffwidget-live"), JSON.parse(text("diffwidget-live-config")));
""")
_LOADER_FOLDER = Markup("""\
import { start } from "./live.js";
const config = JSON.parse(document.getElementById("diffwidget-live-config").textContent);
start(document.getElementById("diffwidget-live"), config, new URL("./", location.href).href);
""")
_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="diffwidget">
<title>{title}</title>
<style>body {{ margin: 24px; background: #fff; }} .licences {{ margin-top: 32px; font: 12px
system-ui, sans-serif; color: #555; }} .licences pre {{ white-space: pre-wrap; }}</style>
</head>
<body>
<div id="diffwidget-live"></div>
<noscript>This page runs a small diffusion model in your browser and needs JavaScript.</noscript>
<script type="application/json" id="diffwidget-live-config">{config}</script>
{assets}<script type="module">
{loader}</script>
<details class="licences"><summary>Licences</summary>
<p>The model runs with onnxruntime-web {ort_version} (MIT licence, Microsoft Corporation),
whose WebAssembly build includes the third-party components listed below.</p>
{licences}</details>
</body>
</html>
"""


@dataclass(frozen=True)
class LivePageConfig:
    """What the page's JavaScript reads (``PageConfig`` in ``js/src/live/assets.ts``)."""

    manifest: dict[str, Any]
    facts: dict[str, Any]
    prompt: str
    compare: str
    onnxruntime_web: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return asdict(self)


def _check_caption(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > MAX_CAPTION_CHARS:
        raise ValueError(f"{what} is longer than {MAX_CAPTION_CHARS} characters")
    return text


def page_facts() -> dict[str, Any]:
    """The facts the Python side owns that the page's payloads repeat (``PageFacts``).

    Examples
    --------
    >>> sorted(page_facts())
    ['function_words', 'normalisation_text', 'preferred_resolution', 'scales']
    """
    from diffwidget.tracing.facts import ATTENTION_VALUE
    from diffwidget.widget.concept_overlay import FUNCTION_WORDS
    from diffwidget.widget.reporting import scale_infos

    return {
        # The live models are the embedded UNet's: cross-attention over the text.
        "scales": scale_infos(ATTENTION_VALUE["text_softmax"]),
        "function_words": sorted(FUNCTION_WORDS),
        "normalisation_text": NORMALISATION_TEXT["text_softmax"],
        "preferred_resolution": PREFERRED_RESOLUTION,
    }


def runtime_version() -> str:
    """The onnxruntime-web version bundled with ``live.js`` (pinned in ``js/package.json``)."""
    _require_bundle()
    return str(json.loads(RUNTIME_FILE.read_text())["onnxruntime_web"])


def _require_bundle() -> None:
    missing = [p for p in (LIVE_JS, STATIC / WASM_FILE, RUNTIME_FILE) if not p.is_file()]
    missing += [LICENCE_DIR / n for n in LICENCE_FILES if not (LICENCE_DIR / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} is missing; build the front end with `npm install && npm run build` "
            "in js/ (or reinstall the package)"
        )


def live_config(prompt: str = "", compare: str = "", model: str = "unet") -> LivePageConfig:
    """The page's config: the manifest (files checked), the facts, the first captions.

    Examples
    --------
    >>> live_config("a red circle").prompt
    'a red circle'
    """
    manifest = load_live_manifest(model)
    return LivePageConfig(
        manifest=manifest.to_json(),
        facts=page_facts(),
        prompt=_check_caption(prompt, "prompt") or EXAMPLE_CAPTIONS[0],
        compare=_check_caption(compare, "compare"),
        onnxruntime_web=runtime_version(),
    )


def _asset_files(manifest: LiveManifest, model: str) -> dict[str, Path]:
    files = {g.file: live_folder(model) / g.file for g in manifest.graphs}
    files[WASM_FILE] = STATIC / WASM_FILE
    return files


def _asset_tag(name: str, path: Path) -> Markup:
    # gzip before base64: base64 text of the .wasm compresses badly, its gzip does not.
    return safe_html(
        '<script type="application/octet-stream" data-file="{name}" data-encoding="gzip">'
        "{data}</script>\n",
        name=name,
        data=base64_text(gzip.compress(path.read_bytes(), GZIP_LEVEL, mtime=0)),
    )


def _licences() -> list[Markup]:
    return [
        safe_html(
            "<h4>{name}</h4>\n<pre>{text}</pre>\n",
            name=name,
            text=(LICENCE_DIR / name).read_text(encoding="utf-8"),
        )
        for name in LICENCE_FILES
    ]


def _page(config: LivePageConfig, title: str | None, assets: list[Markup], loader: Markup) -> str:
    return _TEMPLATE.format(
        title=escape(title or f"diffwidget live: {config.prompt}"),
        config=script_safe_json(config.to_json()),
        assets=markup_join(assets),
        loader=markup_join([loader]),
        ort_version=escape(config.onnxruntime_web),
        licences=markup_join(_licences()),
    )


def write_live_html(
    path: str | Path,
    *,
    prompt: str = "",
    compare: str = "",
    title: str | None = None,
    model: str = "unet",
) -> Path:
    """Write the live page as one offline HTML file (every asset embedded).

    Parameters
    ----------
    path : str or Path
        Target file (``.html`` appended when missing).
    prompt : str
        The caption shown and generated first (default: an example caption).
    compare : str
        A second caption side by side on one slider ("" = off until the reader asks).
    title : str, optional
        Page title.
    model : {"unet"}
        The exported embedded model.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> write_live_html("live.html", prompt="a small blue square at the top")  # doctest: +SKIP
    """
    config = live_config(prompt, compare, model)
    manifest = load_live_manifest(model, check_files=False)
    assets = [_asset_tag(name, file) for name, file in _asset_files(manifest, model).items()]
    assets.append(
        safe_html(
            '<script type="application/octet-stream" id="diffwidget-live-module">'
            "{module}</script>\n",
            module=base64_text(LIVE_JS.read_bytes()),
        )
    )
    path = Path(path)
    if path.suffix != ".html":
        path = path.with_suffix(path.suffix + ".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(config, title, assets, _LOADER_EMBEDDED), encoding="utf-8")
    return path


def write_live_folder(
    folder: str | Path,
    *,
    prompt: str = "",
    compare: str = "",
    title: str | None = None,
    model: str = "unet",
) -> Path:
    """Write the live page as a folder for a static web host (``index.html`` and its assets).

    Returns
    -------
    Path
        The folder's ``index.html``.

    Examples
    --------
    >>> write_live_folder("course/diffusion")  # doctest: +SKIP
    """
    config = live_config(prompt, compare, model)
    manifest = load_live_manifest(model, check_files=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in _asset_files(manifest, model).items():
        shutil.copyfile(file, folder / name)
    shutil.copyfile(live_folder(model) / MANIFEST_FILE, folder / MANIFEST_FILE)
    shutil.copyfile(LIVE_JS, folder / LIVE_JS.name)
    licences = folder / "licenses" / "onnxruntime-web"
    licences.mkdir(parents=True, exist_ok=True)
    for name in LICENCE_FILES:
        shutil.copyfile(LICENCE_DIR / name, licences / name)
    index = folder / "index.html"
    index.write_text(_page(config, title, [], _LOADER_FOLDER), encoding="utf-8")
    return index
