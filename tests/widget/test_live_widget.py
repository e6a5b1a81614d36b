"""The live view as a notebook widget: assets only in its own state, the kernel fallback."""

from __future__ import annotations

import re

import pytest

from diffwidget.models.live_manifest import live_folder, load_live_manifest
from diffwidget.widget import live

pytestmark = pytest.mark.skipif(not live.LIVE_JS.is_file(), reason="needs npm run build in js/")


def test_the_widget_carries_every_asset_and_the_config() -> None:
    from diffwidget.widget.live_widget import LiveExplorer

    explorer = LiveExplorer("a small blue square at the top")
    try:
        assets = explorer.widget.assets
        for graph in load_live_manifest().graphs:
            assert assets[f"unet/{graph.file}"] == (live_folder("unet") / graph.file).read_bytes()
        assert assets[live.WASM_FILE] == (live.STATIC / live.WASM_FILE).read_bytes()
        assert explorer.widget.config["prompt"] == "a small blue square at the top"
        assert not any(name.startswith("dit/") for name in assets)
        assert re.search(r"export\s*\{[^}]*\bas default\b", explorer.widget._esm)
    finally:
        explorer.close()


def test_the_explorer_payload_carries_no_live_assets(synthetic_trace) -> None:
    from diffwidget.widget.explorer import Explorer

    explorer = Explorer(synthetic_trace)
    try:
        names = set(explorer.widget.trait_names())
        assert not {"assets", "config"} & names
    finally:
        explorer.close()


@pytest.mark.slow
def test_a_page_without_webassembly_falls_back_to_the_kernel() -> None:
    from diffwidget.widget.live_widget import LiveExplorer

    explorer = LiveExplorer("a large red circle on the left")
    try:
        reason = "this page's Content-Security-Policy does not allow WebAssembly"
        explorer._on_message(explorer.widget, {"kind": "no_wasm", "reason": reason}, [])
        assert explorer.fallback_reason == reason
        fallback = explorer.fallback_explorer
        assert fallback.trace.prompt == "a large red circle on the left"
        assert fallback.trace.n_steps == load_live_manifest().default_steps
    finally:
        explorer.close()


def test_the_widget_can_carry_both_models() -> None:
    from diffwidget.widget.live_widget import LiveExplorer

    explorer = LiveExplorer("a red circle", models=("unet", "dit"))
    try:
        assets = explorer.widget.assets
        for graph in load_live_manifest("dit").graphs:
            name = f"dit/{graph.file}"
            # The shared decoders travel once, under the UNet's name.
            owner = name if name in assets else f"unet/{graph.file}"
            assert assets[owner] == (live_folder("dit") / graph.file).read_bytes()
        models = explorer.widget.config["models"]
        assert [m["manifest"]["model"] for m in models] == ["unet", "dit"]
    finally:
        explorer.close()
