"""The embedded DiT: pipeline layout, the training-only attention, the flow-matching objective."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import JointAttnProcessor2_0
from scipy import stats

from diffwidget.models.architecture import LATENT_SIZE, MAX_TOKENS, TRAIN_TIMESTEPS
from diffwidget.models.dit import (
    FLOW_SCHEDULER_CONFIG,
    TailWeightedJointAttnProcessor,
    build_dit_components,
    build_dit_pipeline,
    tail_tokens,
    tail_weighted_attention,
)
from diffwidget.models.objectives import (
    FlowObjective,
    LatentSet,
    flow_noisy,
    flow_target,
    sample_sigmas,
)
from diffwidget.models.recipes import CONFIGS

COPIES = 256
MAX_DIT_BYTES = 15_000_000  # float16; the UNet takes the rest of the 30 MB budget


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_dit_pipeline(seed=0)


def _inputs(pipe: Any, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    width = pipe.transformer.config.joint_attention_dim
    return {
        "hidden_states": torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, generator=g),
        "clip": torch.randn(batch, MAX_TOKENS, width, generator=g),
        "tail": torch.randn(batch, 1, width, generator=g),
        "pooled_projections": torch.randn(
            batch, pipe.transformer.config.pooled_projection_dim, generator=g
        ),
        "timestep": torch.tensor([250.0, 900.0][:batch]),
    }


def test_pipeline_layout(pipe: Any) -> None:
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.text_encoder_3 is None
    assert pipe.tokenizer_3 is None
    assert type(pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.vae_scale_factor == 4
    config = pipe.transformer.config
    assert config.joint_attention_dim >= (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert config.pooled_projection_dim == (
        pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    processors = pipe.transformer.attn_processors.values()
    assert all(isinstance(p, JointAttnProcessor2_0) for p in processors)
    n = sum(p.numel() for p in pipe.components["transformer"].parameters())
    n += sum(p.numel() for m in (pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    assert 2 * n <= MAX_DIT_BYTES


def test_pipeline_call_appends_the_zero_tail_the_training_weighs(pipe: Any) -> None:
    assert tail_tokens() == COPIES
    embeds, _, _, _ = pipe.encode_prompt(
        "a red circle on the left", None, None, do_classifier_free_guidance=False
    )
    assert embeds.shape == (1, MAX_TOKENS + COPIES, pipe.transformer.config.joint_attention_dim)
    assert torch.count_nonzero(embeds[:, MAX_TOKENS:]) == 0
    image = pipe("a red circle on the left", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_tail_weighted_attention_equals_the_standard_one_on_duplicated_tokens(pipe: Any) -> None:
    """The whole transformer: 16 + 256 copies (diffusers' processor) vs 16 + 1 (ours)."""
    x = _inputs(pipe)
    transformer = pipe.transformer.eval()
    common = {k: x[k] for k in ("hidden_states", "pooled_projections", "timestep")}
    full = torch.cat([x["clip"], x["tail"].expand(-1, COPIES, -1)], dim=1)
    short = torch.cat([x["clip"], x["tail"]], dim=1)
    with torch.no_grad():
        reference = transformer(encoder_hidden_states=full, **common).sample
        with tail_weighted_attention(transformer, COPIES):
            weighted = transformer(encoder_hidden_states=short, **common).sample
        unweighted = transformer(encoder_hidden_states=short, **common).sample
    torch.testing.assert_close(weighted, reference, rtol=0, atol=1e-5)
    # Without the weight, one zero row is not what the pipeline computes.
    assert (unweighted - reference).abs().max() > 100 * (weighted - reference).abs().max()


def test_tail_weighted_processor_matches_one_block_both_streams(pipe: Any) -> None:
    """One joint attention layer: image and text outputs, with the copies' rows identical."""
    block = pipe.transformer.transformer_blocks[0]
    attn = block.attn
    g = torch.Generator().manual_seed(3)
    dim = attn.to_q.in_features
    image = torch.randn(2, 64, dim, generator=g)
    text, tail = torch.randn(2, 5, dim, generator=g), torch.randn(2, 1, dim, generator=g)
    with torch.no_grad():
        ref_image, ref_text = JointAttnProcessor2_0()(
            attn, image, torch.cat([text, tail.expand(-1, 7, -1)], dim=1)
        )
        out_image, out_text = TailWeightedJointAttnProcessor(7)(
            attn, image, torch.cat([text, tail], dim=1)
        )
    torch.testing.assert_close(out_image, ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_text, ref_text[:, :6], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_text[:, 5:], ref_text[:, 5:6].expand(-1, 7, -1))
    with pytest.raises(ValueError, match="at least 1"):
        TailWeightedJointAttnProcessor(0)


def test_tail_weighted_attention_restores_the_processors_even_on_error(pipe: Any) -> None:
    transformer = pipe.transformer
    before = {k: type(v) for k, v in transformer.attn_processors.items()}
    seen = []

    def fail() -> None:
        with tail_weighted_attention(transformer, COPIES):
            seen.extend(type(p) for p in transformer.attn_processors.values())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert set(seen) == {TailWeightedJointAttnProcessor}
    assert {k: type(v) for k, v in transformer.attn_processors.items()} == before


def test_flow_interpolation_and_target_follow_the_scheduler() -> None:
    """x_sigma against diffusers' scale_noise; one exact Euler step lands on the same path."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for i in (0, 7, 19):
        sigma, t = scheduler.sigmas[i], scheduler.timesteps[i]
        noisy = flow_noisy(x0, noise, sigma.view(1))
        # From scratch, and against diffusers.
        torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
        torch.testing.assert_close(noisy, scheduler.scale_noise(x0, t.view(1), noise))
        assert float(t) == pytest.approx(float(sigma) * TRAIN_TIMESTEPS, rel=1e-5)
        # The true velocity moves x_sigma to x_sigma' of the same (x0, noise) pair.
        scheduler._step_index = i
        step = scheduler.step(flow_target(x0, noise), t, noisy).prev_sample
        expected = flow_noisy(x0, noise, scheduler.sigmas[i + 1].view(1))
        torch.testing.assert_close(step, expected, rtol=0, atol=1e-5)
    # At sigma = 1 (the first inference step) the input holds nothing of the image.
    assert float(scheduler.sigmas[0]) == 1.0
    torch.testing.assert_close(flow_noisy(x0, noise, torch.ones(1)), noise)


def test_sigmas_are_logit_normal() -> None:
    sigmas = sample_sigmas(100_000, torch.Generator().manual_seed(0)).double().numpy()
    assert (sigmas > 0).all()
    assert (sigmas < 1).all()
    for q in (0.1, 0.5, 0.9):
        # P(sigma < s) = Phi(logit(s)) for logit-normal(0, 1).
        expected = 1 / (1 + np.exp(-stats.norm.ppf(q)))
        assert np.quantile(sigmas, q) == pytest.approx(expected, abs=0.005)


def test_flow_objective_equals_a_from_scratch_loss() -> None:
    """The training loss against a hand-written one on the pipeline's inference layout."""
    components = build_dit_components(seed=1)
    config = CONFIGS["dit"]["smoke"]
    objective = FlowObjective(components, config, "cpu")
    captions = ["a red circle on the left", "a small blue square above a green triangle", ""]
    data = LatentSet(
        mean=torch.zeros(3, 4, 16, 16),
        std=torch.zeros(3, 4, 16, 16),
        input_ids=None,
        empty_ids=None,
        captions=captions,
    )
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(3, 4, 16, 16, generator=g)
    batch = torch.tensor([0, 1, 2])
    seed = 11
    loss = objective.loss(latents, batch, data, torch.Generator().manual_seed(seed))

    # The same draws, in the objective's order: noise, sigma, caption dropout.
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    sigmas = torch.sigmoid(torch.randn(3, generator=g))
    drop = torch.rand(3, generator=g) < config.caption_dropout
    texts = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
    features, pooled = [], []
    for name in ("", "_2"):
        tokenizer, encoder = components[f"tokenizer{name}"], components[f"text_encoder{name}"]
        ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
        out = encoder(ids.input_ids, output_hidden_states=True)
        features.append(out.hidden_states[-2])  # SD3 reads the penultimate layer
        pooled.append(out.text_embeds)
    width = components["transformer"].config.joint_attention_dim
    clip = torch.cat(features, dim=-1)
    clip = torch.cat([clip, torch.zeros(3, MAX_TOKENS, width - clip.shape[-1])], dim=-1)
    text = torch.cat([clip, torch.zeros(3, COPIES, width)], dim=1)  # inference: 256 zero rows
    x_sigma = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    pred = components["transformer"](
        hidden_states=x_sigma,
        timestep=sigmas * 1000,
        encoder_hidden_states=text,
        pooled_projections=torch.cat(pooled, dim=-1),
    ).sample
    expected = ((pred - (noise - latents)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert components["transformer"].proj_out.weight.grad is not None
    assert components["text_encoder_2"].text_projection.weight.grad is not None
