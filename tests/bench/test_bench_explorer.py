"""The explorer benchmark measures what it says: one process, real sizes, bytes sent."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_explorer  # noqa: E402

from diffwidget.testing.synthetic import shaped_trace  # noqa: E402


def test_one_measurement_of_a_small_sdxl_shaped_trace(tmp_path):
    path = shaped_trace("sdxl", n_steps=2).save(tmp_path / "t.safetensors")
    out = bench_explorer.measure(str(path), str(tmp_path))
    assert out["build_s"] >= out["build_cpu_s"] * 0.5 > 0  # both clocks read
    assert out["extra_peak_mb"] > 0
    # At open: x0 previews at 128x128 and the default attention on its 64x64 grid.
    assert out["open_parts"]["previews"] == 2 * 128 * 128 * 3
    assert out["open_parts"]["attention"] == 2 * 15 * 64 * 64 + 2 * 15 * 4  # codes, scales
    assert out["open_parts"]["noisy_previews"] == 0
    filters = {f["layer"]: f["sent"] for f in out["filters"]}
    assert filters["32x32"] == 2 * 15 * 32 * 32 + 2 * 15 * 4 + 2 * 15 * 4  # codes, scale, curves
    # Back to the default: its maps are in the page already, and its mass curves are those of
    # "all" just before (SDXL's default averages every layer), so nothing is sent at all.
    assert filters[""] == 0
    assert out["token_sent"] == 70 * 2 * 256 + 70 * 2 * 4  # one token's cells and scales
    assert out["noisy_sent"] == 2 * 128 * 128 * 3
    assert out["export_bytes"] == (tmp_path / "explorer.html").stat().st_size


def test_the_table_reads_before_and_after():
    run = {
        "build_s": 2.0, "build_cpu_s": 1.0, "extra_peak_mb": 100.0, "open_binary": 5e6,
        "filters": [{"s": 0.5, "cpu": 0.2, "sent": 1e6}], "grid_s": 1.0, "grid_cpu_s": 0.5,
        "grid_sent": 2e6, "token_sent": 1e5, "noisy_sent": 3e6, "export_bytes": 9e6,
    }  # fmt: skip
    entry = {"steps": 50, "per_step": 7e6, "file_mb": 354.0, "a": [run], "b": [run]}
    rows = bench_explorer.table({"sdxl": entry}, ("a", "b"))
    assert rows[2].startswith(
        "| SDXL 1024² | 50 | 7.00 MB | 354 MB | 2.00 (1.00) → **2.00 (1.00)**"
    )
