"""The embedded model's architecture: standard components, tokenizer, size, a 2-step run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffwidget.models.architecture import (
    LATENT_SIZE,
    MAX_TOKENS,
    build_demo_pipeline,
    build_tokenizer,
    make_scheduler,
)
from diffwidget.models.scenes import VOCABULARY
from diffwidget.models.tokenizer import FALLBACK_CHARS

MAX_WEIGHTS_BYTES = 25_000_000
BYTES_PER_FP16 = 2
#: 42 fallback characters with and without the word-end mark, 81 merges, start and end. A
#: tokenizer files mix-up gives 3 (transformers 5 ignores ``vocab_file=``).
VOCABULARY_SIZE = 167


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    return build_demo_pipeline(seed=0)


def test_tokenizer_has_the_full_vocabulary_and_one_token_per_word(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = build_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    # Letters and digits with and without the word-end mark, the merges, start and end.
    merges = (tmp_path / "merges.txt").read_text().splitlines()[1:]
    assert len(tokenizer) == len(vocab) == 2 * len(FALLBACK_CHARS) + len(merges) + 2
    assert len(tokenizer) == VOCABULARY_SIZE
    assert tokenizer.model_max_length == MAX_TOKENS
    for word in VOCABULARY:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer(
        "a small red circle left of a large blue square", padding="max_length"
    ).input_ids
    assert len(ids) == MAX_TOKENS
    assert ids[0] == tokenizer.bos_token_id
    assert ids[11] == tokenizer.eos_token_id


def test_text_encoder_matches_tokenizer(pipe) -> None:  # type: ignore[no-untyped-def]
    config = pipe.text_encoder.config
    assert config.vocab_size == len(pipe.tokenizer)
    assert config.max_position_embeddings == pipe.tokenizer.model_max_length
    assert config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.unet.config.cross_attention_dim == config.hidden_size


def test_cross_attention_at_two_resolutions(pipe) -> None:  # type: ignore[no-untyped-def]
    cross = [name for name, _ in pipe.unet.named_modules() if name.endswith("attn2")]
    resolutions = {name.split(".")[0] + name.split(".")[1] for name in cross}
    assert len(cross) >= 4
    assert {"down_blocks0", "down_blocks1", "up_blocks1", "up_blocks2"} <= resolutions


def test_weights_fit_the_package_budget(pipe) -> None:  # type: ignore[no-untyped-def]
    n = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert n * BYTES_PER_FP16 <= MAX_WEIGHTS_BYTES


def test_same_seed_same_weights(pipe) -> None:  # type: ignore[no-untyped-def]
    again = build_demo_pipeline(seed=0)
    other = build_demo_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        a = next(getattr(pipe, name).parameters()).detach().numpy()
        assert np.array_equal(a, next(getattr(again, name).parameters()).detach().numpy())
        assert not np.array_equal(a, next(getattr(other, name).parameters()).detach().numpy())


def test_two_step_generation(pipe) -> None:  # type: ignore[no-untyped-def]
    import torch

    out = pipe(
        "a large red circle on the left",
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape[-1] == LATENT_SIZE


def test_schedulers() -> None:
    assert type(make_scheduler("dpm++")).__name__ == "DPMSolverMultistepScheduler"
    assert make_scheduler("dpm++").config.algorithm_type == "dpmsolver++"
    assert type(make_scheduler("ddim")).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("plms")  # type: ignore[arg-type]
