"""DF-CAM: the toy's region, one forward and one backward for all layers, clean model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from explain_toys import region_mask

from diffwidget.explain.cam import DFCam
from diffwidget.tracing.hooks import block_paths, layer_paths
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
    """The toy's in-region block output is the same for both CFG halves; check alpha's sign."""
    cam = DFCam(blocks=["up_blocks.0"]).attribute(toy_pipe, toy_trace, 1)
    assert cam.meta["cfg_combined"]
    assert cam.meta["guidance_scale"] == toy_trace.guidance_scale
    # up_blocks.0 *is* the output: dy/dA = 1 per half, combined 1 + w (1 - 1) = 1, so
    # CAM = ReLU(sum_k A_k) with A the guided output itself.
    from diffwidget.tracing.replay import StepReplay

    replay = StepReplay(toy_pipe, toy_trace)
    out = replay.model_output(replay.latent(1), 1)[0]
    expected = torch.relu(out.sum(0)).numpy()
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(cam.layers["up_blocks.0"], expected, atol=1e-5)


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
