"""Helpers of the run tests: subprocess runs of the command line, result comparison.

Runs go through the command line in a subprocess with one torch thread, exactly as the
multi-process runs they are compared with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget.explain.faithfulness import InsertionDeletionConfig
from diffwidget.explain.rise import DFRiseConfig

REPO = Path(__file__).resolve().parents[2]
PROMPTS = "scene:4"
#: Few steps, masks and stages: every item takes about a second on one thread.
FAST = [
    "--inference-steps",
    "4",
    "--steps",
    "2",
    "--rise-masks",
    "8",
    "--n-random",
    "1",
    "--cells-per-stage",
    "64",
    "--threads",
    "1",
    "--no-progress",
]
#: The same settings as keyword arguments of ``diffwidget.runs.run``: typed configs.
FAST_KWARGS: dict[str, Any] = {
    "inference_steps": 4,
    "steps": [2],
    "methods": ["attention", DFRiseConfig(n_masks=8), "df_cam"],
    "faithfulness": InsertionDeletionConfig(n_random=1, cells_per_stage=64),
    "progress": False,
}
#: Record entries that say who computed an item and how long it took, not what.
VOLATILE = ("timing", "process")
#: Seconds a subprocess run may take on a loaded 2-core machine.
SUBPROCESS_TIMEOUT = 600


def env() -> dict[str, str]:
    """Environment of subprocess runs: this checkout, one thread, offline."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH", "")) if p)
    out.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return out


def cli(args: list[str], *, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``diffwidget`` (optionally under a launcher) and fail with its output if it fails."""
    command = [*(launcher or [sys.executable]), "-m", "diffwidget.cli", *args]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def results(run_dir: Path) -> dict[str, Any]:
    """Every item's record without the volatile entries, and its arrays."""
    out: dict[str, Any] = {}
    for path in sorted((run_dir / "items").glob("*.json")):
        record = json.loads(path.read_text())
        for key in VOLATILE:
            record.pop(key, None)
        with np.load(run_dir / "arrays" / f"{path.stem}.npz") as arrays:
            record["arrays"] = {k: arrays[k] for k in arrays.files}
        out[path.stem] = record
    return out


def assert_same_results(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Identical records and bit-identical arrays."""
    assert sorted(a) == sorted(b)
    for key in a:
        arrays_a, arrays_b = a[key].pop("arrays"), b[key].pop("arrays")
        try:
            assert a[key] == b[key], key
            assert sorted(arrays_a) == sorted(arrays_b)
            for name in arrays_a:
                np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
        finally:
            a[key]["arrays"], b[key]["arrays"] = arrays_a, arrays_b


def fake_output(item: Any, seed: int) -> Any:
    """What ``compute_item`` returns, made without a pipeline (deterministic, tiny)."""
    from diffwidget.runs.item_records import ItemResult
    from diffwidget.runs.metrics import ItemOutput

    rng = np.random.default_rng(seed)
    record = ItemResult(
        metrics={"fake.score": float(rng.random())}, timesteps=[999, 499], timing={"total": 0.0}
    )
    return ItemOutput(record, None, {"fake@0/map": rng.random((4, 4)).astype(np.float32)})


#: ``fake_compute`` fails these item ids with a RuntimeError, or with a full disk.
FAIL_MESSAGE = "failed on purpose"


def fake_compute(
    calls: Path | None = None,
    *,
    fail: tuple[str, ...] = (),
    disk_full: tuple[str, ...] = (),
    seconds: float = 0.0,
) -> Any:
    """A stand-in for ``runner.compute_item`` that records each call as a file in ``calls``
    (so calls from several processes can be counted)."""
    import errno
    import time

    def compute(_pipe: Any, item: Any, seed: int, *_args: Any, **_kwargs: Any) -> Any:
        if calls is not None:
            calls.mkdir(parents=True, exist_ok=True)
            (calls / f"{item.id}__seed{seed}.{os.getpid()}.{time.monotonic_ns()}").touch()
        time.sleep(seconds)
        if item.id in fail:
            raise RuntimeError(FAIL_MESSAGE)
        if item.id in disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return fake_output(item, seed)

    return compute


def computed_keys(calls: Path) -> list[str]:
    """The item keys ``fake_compute`` was called for, once per call."""
    return sorted(p.name.split(".")[0] for p in calls.iterdir()) if calls.exists() else []
