"""Every denoiser family: exact capture, bounded memory, nothing left behind, exact replay."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffwidget.tracing.attention import CaptureAttnProcessor
from diffwidget.tracing.budget import MemoryBudgetError
from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.decode import to_uint8
from diffwidget.tracing.families import denoiser_family
from diffwidget.tracing.generate import trace
from diffwidget.tracing.replay import StepReplay
from diffwidget.tracing.trace import Trace
from tests.family_cases import CASE_FAMILY, FAMILY_CASES, build_family_case

CASES = sorted(FAMILY_CASES)
TINY_PROMPT = "a red circle on the left"
STEPS = 3
#: float16 storage of probabilities: absolute rounding error per entry is below 2**-11.
FLOAT16_ATOL = 1e-3

FamilyCase = Callable[[str], tuple[Any, dict[str, Any]]]


def _plain(pipe: Any, kwargs: dict[str, Any], output_type: str = "np", seed: int = 1) -> Any:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        TINY_PROMPT,
        num_inference_steps=STEPS,
        generator=generator,
        output_type=output_type,
        **kwargs,
    ).images


@pytest.mark.parametrize("case", CASES)
def test_traced_equals_untraced_bit_for_bit(case: str, family_case: FamilyCase) -> None:
    pipe, kwargs = family_case(case)
    traced = trace(pipe, TINY_PROMPT, num_inference_steps=STEPS, seed=1, **kwargs)
    # trace() passes the pipeline's own defaults; pass the same to the untraced run.
    if "flux" not in case:
        kwargs["guidance_scale"] = 7.5
    np.testing.assert_array_equal(traced.image, to_uint8(np.asarray(_plain(pipe, kwargs)[0])))
    latent = _plain(pipe, kwargs, output_type="latent")
    family = denoiser_family(pipe)
    final = torch.as_tensor(traced.final_latent)[None]
    packed = family.to_model_input(final, family.layout_for(32, 32))
    np.testing.assert_array_equal(packed.numpy(), latent.numpy())


#: Expected capture sites (module paths) per case.
SITES = {
    "sd3": [f"transformer_blocks.{i}.attn" for i in range(2)],
    "sd3_no_t5": [f"transformer_blocks.{i}.attn" for i in range(2)],
    # SD3.5's dual-attention attn2 is image-only self-attention: never captured.
    "sd35": [f"transformer_blocks.{i}.attn" for i in range(2)],
    "flux": [f"transformer_blocks.{i}.attn" for i in range(2)]
    + [f"single_transformer_blocks.{i}.attn" for i in range(2)],
    "pixart": [f"transformer_blocks.{i}.attn2" for i in range(2)],
}
SITES["flux_true_cfg"] = SITES["flux"]


@pytest.mark.parametrize("case", CASES)
def test_every_text_attention_block_is_captured(case: str, family_trace: Any) -> None:
    traced = family_trace(case)
    assert list(traced.attention) == SITES[case]
    assert traced.facts.family == CASE_FAMILY[case]
    n_tokens = len(traced.tokens)
    for layer, maps in traced.attention.items():
        assert maps.shape == (STEPS, 8, 8, n_tokens), layer
        assert maps.dtype == np.float16
        assert np.isfinite(maps).all()
        assert (maps >= 0).all()
    share = traced.facts.attention_normalisation
    assert share == ("text_softmax" if case == "pixart" else "joint_share")


def test_sd35_attn2_is_not_cross_attention(family_case: FamilyCase) -> None:
    pipe, _ = family_case("sd35")
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn2 is not None
    assert not block.attn2.is_cross_attention
    assert "transformer_blocks.0.attn2" not in denoiser_family(pipe).attention_sites()


class _Spy:
    """Calls the original processor and keeps the arguments of its first call."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.first: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = None

    def __call__(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.first is None:
            self.first = (attn, args, kwargs)
        return self.original(attn, *args, **kwargs)


def _full_joint_softmax(case: str, spy: _Spy, text_length: int) -> torch.Tensor:
    """The image→text block of the layer's *full* joint softmax, by the model's own math."""
    from diffusers.models.embeddings import apply_rotary_emb

    assert spy.first is not None
    attn, args, kwargs = spy.first
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    rotary = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
    cond = slice(-1, None)  # the prompt's row ([uncond, cond] under batched CFG)
    with torch.no_grad():
        if case.startswith("sd3"):
            d = attn.to_k.out_features // attn.heads

            def split(x: torch.Tensor) -> torch.Tensor:
                return x[cond].view(1, -1, attn.heads, d).transpose(1, 2)

            q, k = split(attn.to_q(hidden)), split(attn.to_k(hidden))
            eq, ek = split(attn.add_q_proj(text)), split(attn.add_k_proj(text))
            if attn.norm_q is not None:
                q, k = attn.norm_q(q), attn.norm_k(k)
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key = torch.cat([q, eq], 2)[0], torch.cat([k, ek], 2)[0]
            n_image = q.shape[2]
            probs = (query @ key.transpose(1, 2) / math.sqrt(d)).softmax(-1)
            return probs[:, :n_image, n_image:].mean(0)
        d = attn.head_dim

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x[cond].unflatten(-1, (-1, d))

        q, k = attn.norm_q(heads(attn.to_q(hidden))), attn.norm_k(heads(attn.to_k(hidden)))
        if text is not None:  # double-stream: [text, image]
            eq = attn.norm_added_q(heads(attn.add_q_proj(text)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(text)))
            q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
        q = apply_rotary_emb(q, rotary, sequence_dim=1)[0].transpose(0, 1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)[0].transpose(0, 1)
        probs = (q @ k.transpose(1, 2) / math.sqrt(d)).softmax(-1)
        return probs[:, text_length:, :text_length].mean(0)


@pytest.mark.parametrize(
    ("case", "site"),
    [
        ("sd3", "transformer_blocks.1.attn"),
        ("sd35", "transformer_blocks.0.attn"),
        ("flux", "transformer_blocks.1.attn"),
        ("flux", "single_transformer_blocks.0.attn"),
    ],
)
@pytest.mark.parametrize("kernel", ["flash", "math"])
def test_maps_equal_a_full_joint_softmax(
    case: str, site: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways to the log-sum-exp: SDPA's flash kernel hands it back; with the math
    kernel it cannot, and the capture forms it again from the tapped projections."""
    from diffwidget.tracing.families import joint

    from_kernel: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        from_kernel.append(1)
        return joint_text_probs(*args, **kwargs)

    joint_text_probs = joint.text_probs_from_lse
    monkeypatch.setattr(joint, "text_probs_from_lse", counted)
    pipe, kwargs = build_family_case(case)
    module = pipe.transformer.get_submodule(site)
    spy = _Spy(module.processor)
    module.set_processor(spy)
    backend = SDPBackend.FLASH_ATTENTION if kernel == "flash" else SDPBackend.MATH
    try:
        with sdpa_kernel(backend):
            traced = trace(pipe, TINY_PROMPT, num_inference_steps=2, tokens="all", **kwargs)
    finally:
        module.set_processor(spy.original)
    assert bool(from_kernel) == (kernel == "flash")
    n_text = int(traced.facts.n_text_tokens)
    expected = _full_joint_softmax(case, spy, n_text).numpy()
    got = traced.attention[site][0].reshape(-1, n_text).astype(np.float32)
    assert expected.shape == got.shape
    np.testing.assert_allclose(got, expected, atol=FLOAT16_ATOL)
    # Joint rows hold the text share only: well below 1, never above.
    assert (got.sum(-1) < 1 + FLOAT16_ATOL).all()
    assert got.sum(-1).min() > 0


def test_flux_true_cfg_keeps_the_prompts_call(family_trace: Any) -> None:
    """With true_cfg_scale the maps come from the 'cond' call: step 0 equals plain Flux's."""
    distilled, separate = family_trace("flux"), family_trace("flux_true_cfg")
    assert separate.facts.cfg_layout.layout == "separate"
    assert distilled.facts.cfg_layout.layout == "none"
    assert separate.guidance_scale == 2.0
    for layer in distilled.attention:
        np.testing.assert_array_equal(separate.attention[layer][0], distilled.attention[layer][0])


@pytest.mark.parametrize("case", CASES)
def test_replay_reproduces_every_recorded_step(
    case: str, family_case: FamilyCase, family_trace: Any
) -> None:
    pipe, _ = family_case(case)
    traced = family_trace(case)
    replay = StepReplay(pipe, traced)
    for step in range(STEPS):
        out = replay.model_output(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(out, traced.noise_pred[step], atol=1e-5)
        x0 = replay.pred_x0(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(x0, traced.pred_x0[step], rtol=1e-4, atol=1e-4)


def _state(pipe: Any) -> dict[str, Any]:
    denoiser = denoiser_family(pipe).denoiser
    modules = dict(denoiser.named_modules())
    return {
        "processors": {n: m.processor for n, m in modules.items() if hasattr(m, "processor")},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in modules.items()
        },
        "registry": sorted(getattr(denoiser, "_diffusers_hook", None).hooks)
        if hasattr(denoiser, "_diffusers_hook")
        else None,
        "forward": "forward" in vars(denoiser),
        "step": "step" in vars(pipe.scheduler),
        # Module taps are diffusers ModelHooks: no registry, no patched forward left anywhere.
        "registries": sorted(n for n, m in modules.items() if hasattr(m, "_diffusers_hook")),
        "forwards": sorted(n for n, m in modules.items() if "forward" in vars(m)),
    }


class _Boom(RuntimeError):
    """Raised from inside the denoiser in the middle of a traced run."""


@pytest.mark.parametrize("case", CASES)
def test_everything_is_restored_after_an_exception(case: str) -> None:
    pipe, kwargs = build_family_case(case)
    before = _state(pipe)
    calls: list[int] = []

    def explode(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise _Boom

    # A block raising in the second call: every pipeline, callbacks or not.
    block = pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(explode)
    try:
        with pytest.raises(_Boom):
            trace(pipe, TINY_PROMPT, num_inference_steps=STEPS, **kwargs)
    finally:
        handle.remove()
    after = _state(pipe)
    assert after["processors"] == before["processors"]
    assert not any(isinstance(p, CaptureAttnProcessor) for p in after["processors"].values())
    assert after == before


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_are_exact(case: str, family_trace: Any, tmp_path: Any) -> None:
    traced = family_trace(case)
    loaded = Trace.load(traced.save(tmp_path / case))
    for name in ("timesteps", "latents", "noise_pred", "pred_x0", "final_latent", "prompt_embeds"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(traced, name))
    assert loaded.extra.keys() == traced.extra.keys()
    for key, value in traced.extra.items():
        np.testing.assert_array_equal(loaded.extra[key], value)
    assert list(loaded.attention) == list(traced.attention)
    assert loaded.facts == traced.facts


@pytest.mark.parametrize("case", ["sd3", "flux", "pixart"])
def test_non_square_images(case: str, family_case: FamilyCase) -> None:
    pipe, kwargs = family_case(case)
    kwargs.update(height=32, width=48)
    traced = trace(pipe, TINY_PROMPT, num_inference_steps=2, **kwargs)
    assert traced.latent_shape == (16, 24)
    assert traced.image.shape == (32, 48, 3)
    for maps in traced.attention.values():
        assert maps.shape[1:3] == (8, 12)
    replay = StepReplay(pipe, traced)
    out = replay.model_output(replay.latent(1), 1)[0].numpy()
    np.testing.assert_allclose(out, traced.noise_pred[1], atol=1e-5)


@pytest.mark.parametrize("case", ["sd3", "flux", "pixart"])
def test_memory_budget_is_checked_before_running(case: str, family_case: FamilyCase) -> None:
    pipe, kwargs = family_case(case)
    calls: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(MemoryBudgetError, match="memory_budget_mb"):
            trace(pipe, TINY_PROMPT, num_inference_steps=STEPS, memory_budget_mb=1e-3, **kwargs)
    finally:
        handle.remove()
    assert calls == [], "the budget must be checked before the transformer runs"
    size = kwargs.get("height", 32)
    ctx = TraceContext(pipe, prompt=TINY_PROMPT, call_kwargs=kwargs)
    traced = trace(pipe, TINY_PROMPT, num_inference_steps=STEPS, **kwargs)
    assert ctx.step_bytes(size, size).total == traced.nbytes_per_step()


def test_sd3_tokens_appear_twice(family_trace: Any) -> None:
    traced = family_trace("sd3")
    segments, words = traced.facts.token_segments, traced.facts.token_words
    clip = [
        t
        for t, g, k in zip(traced.tokens, segments, traced.token_kinds, strict=True)
        if g == "clip" and k == "word"
    ]
    t5 = [
        t
        for t, g, k in zip(traced.tokens, segments, traced.token_kinds, strict=True)
        if g == "t5" and k == "word"
    ]
    assert clip == t5 == TINY_PROMPT.split()
    # Each word's two copies share its word index.
    assert [w for w, k in zip(words, traced.token_kinds, strict=True) if k == "word"] == [
        *range(6),
        *range(6),
    ]
    without = family_trace("sd3_no_t5")
    assert "<empty>" in without.tokens


def test_skip_layer_guidance_is_refused(family_case: FamilyCase) -> None:
    pipe, kwargs = family_case("sd3")
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        trace(pipe, TINY_PROMPT, num_inference_steps=2, skip_guidance_layers=[0], **kwargs)


@pytest.mark.parametrize("case", ["sd3", "flux", "pixart"])
def test_per_head_maps_average_to_the_stored_maps(
    case: str, family_case: FamilyCase, tmp_path: Any
) -> None:
    pipe, kwargs = family_case(case)
    traced = trace(pipe, TINY_PROMPT, num_inference_steps=2, attention_heads=True, **kwargs)
    heads = denoiser_family(pipe).site_heads()
    assert list(traced.attention_heads) == list(traced.attention)
    for layer, per_head in traced.attention_heads.items():
        assert per_head.shape[:2] == (2, heads[layer])
        assert per_head.shape[2:] == traced.attention[layer].shape[1:]
        mean = per_head.astype(np.float32).mean(axis=1)
        np.testing.assert_allclose(mean, traced.attention[layer], atol=FLOAT16_ATOL)
    ctx = TraceContext(pipe, prompt=TINY_PROMPT, call_kwargs=kwargs, attention_heads=True)
    assert ctx.step_bytes(32, 32).total == traced.nbytes_per_step()
    loaded = Trace.load(traced.save(tmp_path / "heads"))
    for layer, per_head in traced.attention_heads.items():
        np.testing.assert_array_equal(loaded.attention_heads[layer], per_head)


def test_flow_matching_prev_is_the_schedulers_euler_step(family_case: FamilyCase) -> None:
    """FlowMatchEuler steps x + (sigma' - sigma) v: the replay's prev is the next latent."""
    pipe, kwargs = family_case("sd3")
    traced = trace(pipe, TINY_PROMPT, num_inference_steps=4, **kwargs)
    replay = StepReplay(pipe, traced)
    for step in range(3):
        prev = replay.prev(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(prev, traced.latents[step + 1], atol=1e-5)
    last = replay.prev(replay.latent(3), 3)[0].numpy()
    np.testing.assert_allclose(last, traced.final_latent, atol=1e-5)


@pytest.mark.parametrize("solver", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_flow_sigma_solvers_agree_with_the_schedulers_x0(solver: str) -> None:
    """x̂0 under DPM-Solver++/UniPC with flow sigmas equals the solver's own conversion."""
    import copy

    import diffusers

    pipe, kwargs = build_family_case("sd3")
    pipe.scheduler = getattr(diffusers, solver)(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    )
    traced = trace(pipe, TINY_PROMPT, num_inference_steps=4, **kwargs)
    assert traced.facts.noise_schedule.family == "flow"
    reference = copy.deepcopy(pipe.scheduler)
    reference.set_timesteps(4)
    for step in range(4):
        reference._step_index = step
        x0 = reference.convert_model_output(
            torch.as_tensor(traced.noise_pred[step])[None],
            sample=torch.as_tensor(traced.latents[step])[None],
        )
        np.testing.assert_allclose(traced.pred_x0[step], x0[0].numpy(), atol=1e-5)
