"""The CFG layout: one object answers which rows are the prompt's and how halves merge."""

from __future__ import annotations

import pytest
import torch

from diffwidget.tracing.cfg import CfgLayout

W = 3.0
#: A batched call's tensor: row 0 the unconditional half, row 1 the prompt's.
BATCH = torch.tensor([[1.0, 2.0], [5.0, 7.0]])


def test_rows_of_each_layout() -> None:
    batched, separate, none = (CfgLayout(k, W) for k in ("batched", "separate", "none"))
    assert batched.rows("cond", BATCH).tolist() == [[5.0, 7.0]]
    assert batched.rows("uncond", BATCH).tolist() == [[1.0, 2.0]]
    one = BATCH[:1]
    # A separate call holds the half its cache_context names, and nothing of the other.
    assert separate.rows("cond", one, "cond") is one
    assert separate.rows("uncond", one, "cond") is None
    assert separate.rows("uncond", one, "uncond") is one
    assert none.rows("cond", one) is one
    assert none.rows("uncond", one) is None
    with pytest.raises(RuntimeError, match="cache_context"):
        separate.rows("cond", one, None)
    with pytest.raises(RuntimeError, match="equal size"):
        batched.rows("cond", torch.zeros(3, 2))


def test_split_calls_by_label_or_by_the_pipelines_order() -> None:
    separate = CfgLayout("separate", W)
    # Labels decide, whatever the order of the calls.
    assert separate.split_calls(["u", "c"], ["uncond", "cond"]) == ("u", "c")
    # Without labels (a replay): the prompt's call runs first.
    assert separate.split_calls(["c", "u"]) == ("u", "c")
    assert CfgLayout("batched", W).split_calls(["both"]) == (None, "both")
    with pytest.raises(RuntimeError, match="expected 2 denoiser call"):
        separate.split_calls(["c"])
    uncond, cond = CfgLayout("batched", W).step_halves([BATCH])
    assert uncond is not None
    assert (uncond.tolist(), cond.tolist()) == ([[1.0, 2.0]], [[5.0, 7.0]])


def test_guidance_merge_and_gradient_merge() -> None:
    u, c = torch.tensor(1.0), torch.tensor(5.0)
    # u + w (c - u) = 1 + 3 * 4.
    assert float(CfgLayout("batched", W).combine(u, c)) == 13.0
    assert float(CfgLayout("none", W).combine(None, c)) == 5.0
    # The gradient of y(u + w (c - u)) with respect to a combined activation: the halves'
    # gradients already carry (1 - w) and w, so they add.
    a_u = torch.tensor(2.0, requires_grad=True)
    a_c = torch.tensor(3.0, requires_grad=True)
    y = (CfgLayout("batched", W).combine(a_u, a_c)) ** 2
    g_u, g_c = torch.autograd.grad(y, [a_u, a_c])
    combined = 2.0 + W * (3.0 - 2.0)
    assert float(CfgLayout("batched", W).combine_gradients(g_u, g_c)) == pytest.approx(2 * combined)


def test_run_calls_the_denoiser_as_the_pipeline_does() -> None:
    seen: list[tuple[str, ...]] = []

    def denoiser(halves: tuple[str, ...]) -> torch.Tensor:
        seen.append(halves)
        return torch.tensor([[10.0] if h == "cond" else [4.0] for h in halves])

    assert CfgLayout("batched", W).run(denoiser).tolist() == [[4.0 + W * 6.0]]
    assert CfgLayout("separate", W).run(denoiser).tolist() == [[4.0 + W * 6.0]]
    assert CfgLayout("none", W).run(denoiser).tolist() == [[10.0]]
    assert seen == [("uncond", "cond"), ("cond",), ("uncond",), ("cond",)]


def test_observe_and_stored_rows() -> None:
    assert CfgLayout.observe([(None, 2)], W).kind == "batched"
    assert CfgLayout.observe([(None, 1)], W).kind == "none"
    assert CfgLayout.observe([("cond", 1), ("uncond", 1)], W).kind == "separate"
    # Flux labels its only call "cond": while it runs it may be the first of two.
    assert CfgLayout.observe([("cond", 1)], W, complete=False).kind == "separate"
    assert CfgLayout.observe([("cond", 1)], W).kind == "none"
    with pytest.raises(RuntimeError, match="one image at a time"):
        CfgLayout.observe([(None, 4)], W)
    with pytest.raises(RuntimeError, match="3 times"):
        CfgLayout.observe([(None, 2)] * 3, W)
    stored = torch.tensor([[0.0], [1.0]])
    assert stored[CfgLayout.stored_row("cond")].item() == 1.0
    assert stored[CfgLayout.stored_row("uncond")].item() == 0.0
    assert CfgLayout("separate", W).stored(["c", "u"], ["cond", "uncond"]) == ["u", "c"]
