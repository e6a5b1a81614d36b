"""The live page: the embedded models generating in the reader's browser (no kernel, no server).

The page runs the embedded UNet, the embedded DiT, or both side by side on one caption
(``models=("unet", "dit")``: the same caption through cross-attention and DPM-Solver++ and
through joint attention and flow matching). Only the models a page names are in it, so a
UNet page does not carry the DiT's weights. Two forms of one page (both built from the
exported graphs in ``diffwidget/models/live`` and the lazily loaded bundle
``static/live.js`` with onnxruntime-web's WebAssembly binary):

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget._markup import Markup, base64_text, escape, markup_join, safe_html
from diffwidget.explain.attention import PREFERRED_RESOLUTION, attention_kind
from diffwidget.models.live_manifest import (
    LIVE_MODELS,
    MANIFEST_FILE,
    LiveManifest,
    LiveModel,
    is_live_model,
    live_folder,
    load_live_manifest,
)
from diffwidget.models.scenes import EXAMPLE_CAPTIONS
from diffwidget.tracing.trace import NORMALISATION_TEXT
from diffwidget.widget.export import script_safe_json
from diffwidget.widget.model import STATIC

if TYPE_CHECKING:
    from diffwidget.tracing.live_run import FirstRun

LIVE_JS = STATIC / "live.js"
WASM_FILE = "ort-wasm-simd-threaded.wasm"
RUNTIME_FILE = STATIC / "live_runtime.json"
LICENCE_DIR = STATIC / "licenses" / "onnxruntime-web"
LICENCE_FILES = ("LICENSE", "ThirdPartyNotices.txt")
GZIP_LEVEL = 9
#: Longest caption accepted for the page (the model reads 14 words; the box holds more).
MAX_CAPTION_CHARS = 500
#: What each panel of a page with several models is headed with.
MODEL_LABELS: dict[str, str] = {
    "unet": "UNet: cross-attention, DPM-Solver++",
    "dit": "DiT (MMDiT): joint attention, flow matching",
}

# The loaders and the asset tags are markup this module writes: Markup, never data.
_LOADER_EMBEDDED = Markup("""\
const text = (id) => document.getElementById(id).textContent.trim();
const packed = Uint8Array.from(atob(text("diffwidget-live-module")), (c) => c.charCodeAt(0));
const gunzip = new Blob([packed]).stream().pipeThrough(new DecompressionStream("gzip"));
const bytes = await new Response(gunzip).arrayBuffer();
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
class LiveModelConfig:
    """One model of the page (``ModelConfig`` in ``js/src/live/assets.ts``)."""

    manifest: dict[str, Any]
    facts: dict[str, Any]
    label: str


@dataclass(frozen=True)
class LivePageConfig:
    """What the page's JavaScript reads (``PageConfig`` in ``js/src/live/assets.ts``)."""

    #: The models, in the order their panels are shown (assets load in this order).
    models: tuple[LiveModelConfig, ...]
    prompt: str
    compare: str
    onnxruntime_web: str
    #: Per model, ``prompt`` generated ahead (drawn while the runtime loads); may be empty.
    first: tuple[FirstRun, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return asdict(self)


def _check_caption(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > MAX_CAPTION_CHARS:
        raise ValueError(f"{what} is longer than {MAX_CAPTION_CHARS} characters")
    return text


def page_facts(manifest: LiveManifest | None = None) -> dict[str, Any]:
    """The facts the Python side owns that the page's payloads repeat (``PageFacts``).

    Parameters
    ----------
    manifest : LiveManifest, optional
        The model's manifest (the UNet's by default): its attention normalisation picks the
        colour-scale text and the description (cross-attention or joint-attention share).

    Examples
    --------
    >>> sorted(page_facts())  # doctest: +NORMALIZE_WHITESPACE
    ['attention_kind', 'function_words', 'normalisation_text', 'preferred_resolution',
     'scales', 'tail_kind', 'tail_token']
    """
    from diffwidget.tracing.facts import ATTENTION_VALUE
    from diffwidget.tracing.tokens import EMPTY_TOKEN, empty_tokens
    from diffwidget.widget.concept_overlay import FUNCTION_WORDS
    from diffwidget.widget.reporting import scale_infos

    manifest = manifest if manifest is not None else load_live_manifest("unet", check_files=False)
    normalisation = manifest.attention_normalisation
    return {
        "scales": scale_infos(ATTENTION_VALUE[normalisation]),
        "function_words": sorted(FUNCTION_WORDS),
        "attention_kind": attention_kind(normalisation),
        "normalisation_text": NORMALISATION_TEXT[normalisation],
        "preferred_resolution": PREFERRED_RESOLUTION,
        # How a trace shows the all-zero positions of an absent T5 (the DiT's text tail).
        "tail_token": EMPTY_TOKEN,
        "tail_kind": empty_tokens(1).kinds[0],
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


def check_models(models: str | Sequence[str]) -> tuple[LiveModel, ...]:
    """The page's models as a tuple: known, each once, at least one.

    Examples
    --------
    >>> check_models("dit"), check_models(["unet", "dit"])
    (('dit',), ('unet', 'dit'))
    """
    chosen = (models,) if isinstance(models, str) else tuple(models)
    unknown = [m for m in chosen if m not in LIVE_MODELS]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"models must name each of {LIVE_MODELS} at most once (at least one), got {chosen}"
        )
    return tuple(m for m in chosen if is_live_model(m))  # all of them: checked above


def first_runs(
    prompt: str, models: Sequence[str], first_image: bool | None
) -> tuple[FirstRun, ...]:
    """Each model's run of ``prompt`` at the page's defaults, computed now with onnxruntime.

    ``first_image=None`` computes them when onnxruntime is installed (none otherwise: the
    page then generates its first image itself); ``True`` requires it; ``False`` skips.
    """
    if first_image is False:
        return ()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if first_image:
            raise ImportError(
                "the first image is computed with onnxruntime: pip install "
                "'diffwidget[live-export]', or leave the first image to the browser"
            ) from None
        return ()
    from diffwidget.tracing.live_run import first_run

    return tuple(first_run(model, prompt) for model in models)


def live_config(
    prompt: str = "",
    compare: str = "",
    models: str | Sequence[str] = "unet",
    first_image: bool | None = False,
) -> LivePageConfig:
    """The page's config: each model's manifest (files checked) and facts, the captions.

    ``first_image`` (see :func:`first_runs`) embeds the first caption generated ahead.

    Examples
    --------
    >>> live_config("a red circle").prompt
    'a red circle'
    >>> [m.label for m in live_config(models=("unet", "dit")).models]
    ['UNet: cross-attention, DPM-Solver++', 'DiT (MMDiT): joint attention, flow matching']
    """
    configs = []
    chosen = check_models(models)
    for model in chosen:
        manifest = load_live_manifest(model)
        configs.append(
            LiveModelConfig(manifest.to_json(), page_facts(manifest), MODEL_LABELS[model])
        )
    caption = _check_caption(prompt, "prompt") or EXAMPLE_CAPTIONS[0]
    return LivePageConfig(
        models=tuple(configs),
        prompt=caption,
        compare=_check_caption(compare, "compare"),
        onnxruntime_web=runtime_version(),
        first=first_runs(caption, chosen, first_image),
    )


def asset_files(models: str | Sequence[str] = "unet") -> dict[str, Path]:
    """Every file the page loads, by the name the page asks for (``assets.ts`` ``assetName``).

    A graph is named ``<model>/<file>``; bytes an earlier model of the page already has
    (same SHA-256: the DiT shares the UNet's decoders) are not shipped again, the page
    reuses them.

    Examples
    --------
    >>> sorted(asset_files(("unet", "dit")))  # doctest: +NORMALIZE_WHITESPACE
    ['dit/text_encoder.onnx', 'dit/transformer.onnx', 'ort-wasm-simd-threaded.wasm',
     'unet/preview.onnx', 'unet/text_encoder.onnx', 'unet/unet.onnx', 'unet/vae.onnx']
    """
    files: dict[str, Path] = {}
    seen: set[str] = set()
    for model in check_models(models):
        for graph in load_live_manifest(model, check_files=False).graphs:
            if graph.sha256 not in seen:
                seen.add(graph.sha256)
                files[f"{model}/{graph.file}"] = live_folder(model) / graph.file
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
    models: str | Sequence[str] = "unet",
    first_image: bool | None = None,
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
    models : {"unet", "dit"} or a sequence of them
        The embedded models, side by side on each caption in this order.
    first_image : bool, optional
        Embed ``prompt`` generated now (onnxruntime, the page's defaults) so the page draws
        it at once while its runtime loads. Default: when onnxruntime is installed.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> write_live_html("live.html", prompt="a small blue square at the top")  # doctest: +SKIP
    """
    config = live_config(prompt, compare, models, first_image)
    assets = [_asset_tag(name, file) for name, file in asset_files(models).items()]
    assets.append(
        safe_html(
            '<script type="application/octet-stream" id="diffwidget-live-module">'
            "{module}</script>\n",
            module=base64_text(gzip.compress(LIVE_JS.read_bytes(), GZIP_LEVEL, mtime=0)),
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
    models: str | Sequence[str] = "unet",
    first_image: bool | None = None,
) -> Path:
    """Write the live page as a folder for a static web host (``index.html`` and its assets).

    Graphs go into one sub-folder per model (``unet/``, ``dit/``) with its ``manifest.json``;
    ``first_image`` as in :func:`write_live_html`.

    Returns
    -------
    Path
        The folder's ``index.html``.

    Examples
    --------
    >>> write_live_folder("course/diffusion")  # doctest: +SKIP
    """
    config = live_config(prompt, compare, models, first_image)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for model in check_models(models):
        (folder / model).mkdir(exist_ok=True)
        shutil.copyfile(live_folder(model) / MANIFEST_FILE, folder / model / MANIFEST_FILE)
    for name, file in asset_files(models).items():
        shutil.copyfile(file, folder / name)
    shutil.copyfile(LIVE_JS, folder / LIVE_JS.name)
    licences = folder / "licenses" / "onnxruntime-web"
    licences.mkdir(parents=True, exist_ok=True)
    for name in LICENCE_FILES:
        shutil.copyfile(LICENCE_DIR / name, licences / name)
    index = folder / "index.html"
    index.write_text(_page(config, title, [], _LOADER_FOLDER), encoding="utf-8")
    return index
