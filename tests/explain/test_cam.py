"""DF-CAM: the toy's region, one forward and one backward for all layers, clean model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from explain_toys import region_mask

from diffwidget.explain.cam import DFCam
from diffwidget.tracing.families.unet import block_paths, layer_paths
from diffwidget.tracing.trace import Trace


def test_points_at_the_region_the_toy_depends_on(toy_pipe: Any, toy_trace: Trace) -> None:
    cam = DFCam(blocks=["down_blocks.0"]).attribute(toy_pipe, toy_trace, 0)
    inside = region_mask().bool().numpy()
    layer = cam.layers["down_blocks.0"]
    # Only the in-region channels reach the output directly; the out-of-region ones act
    # only through the toy's faint attention path, so the CAM is nearly zero outside.
    assert layer[~inside].max() < 1e-3
    assert layer[inside].max() == 1.0
    np.testing.assert_array_equal(cam.map, layer)


def test_all_blocks_in_one_forward_and_one_backward(
    sd_pipe: Any, sd_trace: Trace, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"forward": 0, "backward": 0}
    grad = torch.autograd.grad

    def counting_grad(*args: Any, **kwargs: Any) -> Any:
        calls["backward"] += 1
        return grad(*args, **kwargs)

    def count_forward(*_: Any) -> None:
        calls["forward"] += 1

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("no .backward()"))
    unet = sd_pipe.unet
    handle = unet.register_forward_pre_hook(count_forward)
    try:
        cam = DFCam().attribute(sd_pipe, sd_trace, 2)
    finally:
        handle.remove()
    assert calls == {"forward": 1, "backward": 1}
    assert list(cam.layers) == layer_paths(unet)
    for layer in cam.layers.values():
        assert layer.shape == sd_trace.latent_shape
        assert layer.min() >= 0
        assert layer.max() <= 1
    assert cam.map.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam.raw, sum(cam.layers.values()), atol=1e-6)
    assert all(p.grad is None for p in unet.parameters()), "UNet parameters must stay clean"


def test_cfg_combination_by_hand(toy_pipe: Any, toy_trace: Trace) -> None:
    """On the toy, up_blocks.0 *is* the output: the unnormalised CAM is known exactly.

    y = sum(u + w (c - u)) with u and c the two halves of up_blocks.0's output, so
    dy/dA_u = 1 - w and dy/dA_c = w everywhere; their sum is 1, hence alpha_k = 1 and
    CAM = ReLU(sum_k A_k) with A the guided output. Combining the gradients again with w
    (guidance applied twice) gives alpha = 1 - 2w + 2w^2 = 13 at w = 3.
    """
    from diffwidget.tracing.replay import StepReplay

    cam = DFCam(blocks=["up_blocks.0"]).attribute(toy_pipe, toy_trace, 1)
    assert cam.meta["cfg_combined"]
    assert cam.meta["guidance_scale"] == toy_trace.guidance_scale == 3.0
    replay = StepReplay(toy_pipe, toy_trace)
    out = replay.model_output(replay.latent(1), 1)[0]
    expected = torch.relu(out.sum(0)).numpy()
    np.testing.assert_allclose(cam.layers_raw["up_blocks.0"], expected, rtol=1e-5, atol=1e-6)
    assert cam.meta["target"] == "sum of the guided model output (sample)"


def _separate_pass_cam(pipe: Any, trace: Trace, step: int, path: str) -> np.ndarray:
    """DF-CAM by its definition, with the two CFG halves run as separate UNet calls."""
    import torch.nn.functional as F

    unet = pipe.unet
    w = float(trace.guidance_scale)
    # The UNet's inputs as the pipeline built them, read from the trace's own record.
    t = torch.tensor(trace.facts.model_timesteps[step])
    scale = trace.facts.noise_schedule.model_input_scale[step]
    x_in = torch.as_tensor(trace.latents[step])[None] * scale
    embeds = torch.as_tensor(trace.prompt_embeds)
    acts: list[torch.Tensor] = []
    handle = unet.get_submodule(path).register_forward_hook(
        lambda _m, _i, out: acts.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.enable_grad():
            u = unet(x_in, t, encoder_hidden_states=embeds[0:1]).sample
            c = unet(x_in, t, encoder_hidden_states=embeds[1:2]).sample
            y = (u + w * (c - u)).sum()
            g_u, g_c = torch.autograd.grad(y, acts)
    finally:
        handle.remove()
    a = acts[0].detach()[0] + w * (acts[1].detach()[0] - acts[0].detach()[0])
    alpha = (g_u[0] + g_c[0]).mean(dim=(1, 2))
    cam = torch.relu((alpha[:, None, None] * a).sum(0))
    up = F.interpolate(cam[None, None], size=trace.latent_shape, mode="bilinear")
    return up[0, 0].numpy()


def test_cfg_matches_separate_unet_calls(sd_pipe: Any, sd_trace: Trace) -> None:
    """The batched, one-backward DF-CAM equals the definition computed call by call."""
    paths = ["down_blocks.1.attentions.0", "mid_block", "up_blocks.1.resnets.0"]
    cam = DFCam(blocks=paths).attribute(sd_pipe, sd_trace, 2)
    for path in paths:
        expected = _separate_pass_cam(sd_pipe, sd_trace, 2, path)
        assert expected.max() > 0
        np.testing.assert_allclose(
            cam.layers_raw[path], expected, rtol=1e-4, atol=1e-5 * expected.max()
        )


def test_without_cfg_matches_captum_layer_gradcam(sd_pipe: Any) -> None:
    """guidance_scale 1 runs one UNet half: DF-CAM is then captum's LayerGradCam."""
    from captum.attr import LayerAttribution, LayerGradCam
    from explain_support import PROMPT, record_trace

    from diffwidget.tracing.replay import StepReplay

    trace = record_trace(sd_pipe, PROMPT, guidance=1.0)
    path = "up_blocks.1.attentions.0"
    cam = DFCam(blocks=[path]).attribute(sd_pipe, trace, 1)
    assert not cam.meta["cfg_combined"]
    replay = StepReplay(sd_pipe, trace)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return replay.model_output(x, 1, grad=True).sum(dim=(1, 2, 3))

    gradcam = LayerGradCam(forward, sd_pipe.unet.get_submodule(path))
    with torch.enable_grad():
        reference = gradcam.attribute(replay.latent(1), relu_attributions=True)
    reference = LayerAttribution.interpolate(reference, trace.latent_shape, "bilinear")
    expected = reference[0, 0].detach().numpy()
    assert expected.max() > 0
    np.testing.assert_allclose(cam.layers_raw[path], expected, rtol=1e-4, atol=1e-6)


def test_works_inside_no_grad(sd_pipe: Any, sd_trace: Trace) -> None:
    """Step callbacks and user code often run under torch.no_grad(); DF-CAM still works."""
    expected = DFCam(blocks=["mid_block"]).attribute(sd_pipe, sd_trace, 1)
    with torch.no_grad():
        inside = DFCam(blocks=["mid_block"]).attribute(sd_pipe, sd_trace, 1)
    np.testing.assert_array_equal(inside.layers_raw["mid_block"], expected.layers_raw["mid_block"])


def test_submodule_paths_and_errors(sd_pipe: Any, sd_trace: Trace) -> None:
    path = "down_blocks.1.attentions.0"
    cam = DFCam(blocks=[path]).attribute(sd_pipe, sd_trace, 0)
    assert list(cam.layers) == [path]
    with pytest.raises(KeyError, match="Did you mean"):
        DFCam(blocks=["down_block.1"]).attribute(sd_pipe, sd_trace, 0)
    with pytest.raises(ValueError, match="blocks is empty"):
        DFCam(blocks=[])


def test_sdxl(tiny_sdxl_pipe: Any, sdxl_trace: Trace) -> None:
    cam = DFCam().attribute(tiny_sdxl_pipe, sdxl_trace, 1)
    assert cam.map.shape == sdxl_trace.latent_shape
    assert np.isfinite(cam.raw).all()


def test_layer_paths_follow_the_forward_pass(sd_pipe: Any, sd_trace: Trace) -> None:
    """The default layers are every resnet, attention and resampler, in the order they run."""
    from diffwidget.tracing.replay import StepReplay

    unet = sd_pipe.unet
    paths = layer_paths(unet)
    ran: list[str] = []
    handles = [
        unet.get_submodule(p).register_forward_hook(lambda *_, p=p: ran.append(p)) for p in paths
    ]
    try:
        replay = StepReplay(sd_pipe, sd_trace)
        replay.model_output(replay.latent(0), 0)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == paths
    assert all(
        p.split(".")[-2] in {"resnets", "attentions", "downsamplers", "upsamplers"} for p in paths
    )
    # Each top-level block contributes its layers, in block order.
    blocks = [b for b in block_paths(unet) if any(p.startswith(b + ".") for p in paths)]
    assert blocks == block_paths(unet)
