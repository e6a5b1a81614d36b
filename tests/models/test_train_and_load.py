"""The training recipe runs end to end, and the loader is offline with clear errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from diffwidget.models.loader import (
    DEMO_DIR,
    demo_weights_available,
    export_demo_weights,
    load_demo_pipeline,
    weights_size_bytes,
)
from diffwidget.models.train import CONFIGS, latest_checkpoint, main, train

MAX_WEIGHTS_BYTES = 25_000_000


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    train(CONFIGS["smoke"], out, seed=0, progress=False)
    return out


def _generate(pipe) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    return pipe(
        "a small blue square at the top",
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_smoke_training_writes_a_loadable_checkpoint(smoke_run: Path, no_network: None) -> None:
    checkpoint = latest_checkpoint(smoke_run)
    assert checkpoint.name.startswith("checkpoint-")
    assert (checkpoint / "model_index.json").is_file()
    assert not list(smoke_run.glob(".tmp-*")), "a temporary folder was left behind"
    pipe = load_demo_pipeline(path=checkpoint)
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latents' std
    assert pipe.unet.config.sample_size == 16


def test_export_writes_fp16_weights_that_load(smoke_run: Path, tmp_path: Path) -> None:
    dest = export_demo_weights(smoke_run, tmp_path / "demo")
    assert (dest / "training.json").is_file()
    fp32 = weights_size_bytes(latest_checkpoint(smoke_run))
    assert weights_size_bytes(dest) < 0.6 * fp32
    pipe = load_demo_pipeline(path=dest)
    assert next(pipe.unet.parameters()).dtype.is_floating_point
    assert np.isfinite(_generate(pipe)).all()


def test_command_line_step_counts_replace_the_time_caps(tmp_path: Path) -> None:
    main(["--config", "smoke", "--out", str(tmp_path), "--vae-steps", "1", "--unet-steps", "2"])
    state = json.loads((latest_checkpoint(tmp_path) / "train_state.json").read_text())
    assert (state["vae_steps_done"], state["unet_steps_done"]) == (1, 2)
    assert state["config"]["unet_minutes"] is None


def test_missing_weights_error_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"diffwidget\.models\.train"):
        load_demo_pipeline(path=tmp_path / "nowhere")


def test_latest_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_checkpoint(tmp_path)


@pytest.mark.skipif(not demo_weights_available(), reason="no shipped weights in this checkout")
def test_shipped_weights_load_offline(no_network: None) -> None:
    assert weights_size_bytes(DEMO_DIR) <= MAX_WEIGHTS_BYTES
    pipe = load_demo_pipeline()
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert _generate(pipe).shape == (1, 64, 64, 3)


def test_loading_restores_library_logging(smoke_run: Path) -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_info()
    diffusers_logging.set_verbosity_debug()
    try:
        load_demo_pipeline(path=latest_checkpoint(smoke_run))
        assert transformers_logging.get_verbosity() == transformers_logging.INFO
        assert diffusers_logging.get_verbosity() == diffusers_logging.DEBUG
        assert transformers_logging.is_progress_bar_enabled() == bars
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])
