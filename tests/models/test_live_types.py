"""The TypeScript side reads the same records the Python side writes (field for field)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from diffwidget.models import live_manifest

JS = Path(__file__).resolve().parents[2] / "js" / "src"


def ts_fields(path: Path, name: str) -> set[str]:
    """Field names of ``export interface name { ... }`` in a TypeScript file."""
    text = path.read_text()
    match = re.search(rf"export interface {name} \{{(.*?)\n\}}", text, re.S)
    assert match is not None, f"{name} not found in {path}"
    return set(re.findall(r"^  (\w+)\??:", match.group(1), re.M))


@pytest.mark.parametrize(
    "record",
    [
        live_manifest.GraphFile,
        live_manifest.AttentionOutput,
        live_manifest.TokenizerFacts,
        live_manifest.SchedulerFacts,
        live_manifest.FlowMatchFacts,
        live_manifest.LiveManifest,
    ],
)
def test_manifest_records_match_their_typescript_interfaces(record) -> None:
    fields = {f.name for f in dataclasses.fields(record)}
    assert ts_fields(JS / "live" / "manifest.ts", record.__name__) == fields


def test_page_config_and_facts_match() -> None:
    from diffwidget.widget.live import LiveModelConfig, LivePageConfig, page_facts

    config = {f.name for f in dataclasses.fields(LivePageConfig)}
    assert ts_fields(JS / "live" / "assets.ts", "PageConfig") == config
    model = {f.name for f in dataclasses.fields(LiveModelConfig)}
    assert ts_fields(JS / "live" / "assets.ts", "ModelConfig") == model
    assert ts_fields(JS / "live" / "payloads.ts", "PageFacts") == set(page_facts())
