"""The training recipes run end to end, and the loader is offline with clear errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from diffwidget.models.architecture import build_tokenizer
from diffwidget.models.loader import (
    DEMO_DIR,
    DEMO_MODEL_ENV,
    DIT_DIR,
    RECOMMENDED_GUIDANCE,
    demo_weights_available,
    export_demo_weights,
    load_demo_pipeline,
    weights_size_bytes,
)
from diffwidget.models.recipes import CONFIGS
from diffwidget.models.train import RESUME_FILE, VAE_FOLDER, latest_checkpoint, main, train

MAX_WEIGHTS_BYTES = 30_000_000  # both embedded models together
SHIPPED = demo_weights_available(DEMO_DIR) and demo_weights_available(DIT_DIR)


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
    train(CONFIGS["unet"]["smoke"], out, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def dit_smoke_run(tmp_path_factory: pytest.TempPathFactory, smoke_run: Path) -> Path:
    """The DiT recipe on the UNet smoke run's VAE (as the shipped DiT uses the UNet's)."""
    out = tmp_path_factory.mktemp("smoke_dit")
    train(
        CONFIGS["dit"]["smoke"],
        out,
        seed=0,
        progress=False,
        model="dit",
        vae_from=smoke_run / VAE_FOLDER,
    )
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


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    """Two steps, then two more from the resume file, equal four steps in one go."""
    import torch
    from safetensors.torch import load_file

    args = ["--config", "smoke", "--vae-steps", "1"]
    main([*args, "--out", str(tmp_path / "a"), "--unet-steps", "2"])
    assert (tmp_path / "a" / RESUME_FILE).is_file()
    main([*args, "--out", str(tmp_path / "a"), "--unet-steps", "4"])
    main([*args, "--out", str(tmp_path / "b"), "--unet-steps", "4"])
    resumed, straight = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert json.loads((resumed / "train_state.json").read_text())["resumed_at"] == [2]
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(resumed / name)), load_file(str(straight / name))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_dit_smoke_training_writes_an_sd3_pipeline(dit_smoke_run: Path, no_network: None) -> None:
    checkpoint = latest_checkpoint(dit_smoke_run)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert (state["model"], state["unet_steps_done"]) == ("dit", CONFIGS["dit"]["smoke"].unet_steps)
    pipe = load_demo_pipeline("dit", path=checkpoint)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert pipe.text_encoder_3 is None
    assert pipe.tokenizer_3 is None
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.recommended_guidance_scale == RECOMMENDED_GUIDANCE["dit"]
    assert np.isfinite(_generate(pipe)).all()


def test_dit_export_shares_the_unet_vae(
    smoke_run: Path, dit_smoke_run: Path, tmp_path: Path
) -> None:
    unet_dest = export_demo_weights(smoke_run, tmp_path / "demo")
    dit_dest = export_demo_weights(
        dit_smoke_run, tmp_path / "demo_dit", model="dit", shared_vae=unet_dest / "vae"
    )
    assert not (dit_dest / "vae").exists()
    assert (dit_dest / "training.json").is_file()
    with pytest.raises(FileNotFoundError):
        # Without the shared VAE beside it, the loader falls back to the shipped one; a
        # folder that holds no pipeline at all is still refused.
        load_demo_pipeline("dit", path=tmp_path / "nowhere")
    pipe = load_demo_pipeline("dit", path=dit_dest)
    assert np.isfinite(_generate(pipe)).all()
    # A DiT trained on another VAE must not be shipped beside this one.
    with pytest.raises(ValueError, match="another VAE"):
        export_demo_weights(
            dit_smoke_run, tmp_path / "bad", model="dit", shared_vae=smoke_run / VAE_FOLDER
        )


def test_missing_weights_error_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"diffwidget\.models\.train"):
        load_demo_pipeline(path=tmp_path / "nowhere")


def test_latest_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_checkpoint(tmp_path)


@pytest.mark.skipif(not SHIPPED, reason="no shipped weights of both models in this checkout")
def test_shipped_weights_load_offline(no_network: None) -> None:
    assert weights_size_bytes(DEMO_DIR) + weights_size_bytes(DIT_DIR) <= MAX_WEIGHTS_BYTES
    assert not (DIT_DIR / "vae").exists()  # the DiT loads the UNet's VAE
    pipe = load_demo_pipeline()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert _generate(pipe).shape == (1, 64, 64, 3)
    assert type(load_demo_pipeline("unet").unet).__name__ == "UNet2DConditionModel"
    dit = load_demo_pipeline("dit")
    assert type(dit.transformer).__name__ == "SD3Transformer2DModel"
    assert _generate(dit).shape == (1, 64, 64, 3)


@pytest.mark.skipif(not SHIPPED, reason="no shipped weights of both models in this checkout")
def test_shipped_tokenizers_match_their_text_encoders() -> None:
    expected = len(build_tokenizer())  # its size is pinned in test_architecture.py
    for pipe in (load_demo_pipeline("unet"), load_demo_pipeline("dit")):
        for tokenizer, encoder in (
            (pipe.tokenizer, pipe.text_encoder),
            (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
        ):
            if tokenizer is None:
                continue
            assert len(tokenizer) == encoder.config.vocab_size == expected


def test_unknown_model_name_says_which_exist() -> None:
    with pytest.raises(ValueError, match=r"'unet'.*'dit'"):
        load_demo_pipeline("sdxl")  # type: ignore[arg-type]


def test_dit_refuses_a_unet_scheduler() -> None:
    with pytest.raises(ValueError, match="flow-matching"):
        load_demo_pipeline("dit", scheduler="ddim")


def test_a_folder_of_the_other_model_is_refused(smoke_run: Path) -> None:
    with pytest.raises(ValueError, match="model='unet'"):
        load_demo_pipeline("dit", path=latest_checkpoint(smoke_run))


def test_the_environment_names_the_default_model(
    smoke_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEMO_MODEL_ENV, "dit")
    # The UNet checkpoint is refused because the environment asked for the DiT ...
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        load_demo_pipeline(path=latest_checkpoint(smoke_run))
    # ... an explicit name wins over the environment.
    assert type(load_demo_pipeline("unet", path=latest_checkpoint(smoke_run))).__name__ == (
        "StableDiffusionPipeline"
    )
    monkeypatch.setenv(DEMO_MODEL_ENV, "vit")
    with pytest.raises(ValueError, match="unknown embedded model"):
        load_demo_pipeline(path=latest_checkpoint(smoke_run))


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
