"""Reading module outputs by their diffusers module paths, with hooks that always go away.

Attention goes through attention processors (see :mod:`diffwidget.tracing.attention`);
whole blocks (for DF-CAM and concept probes) have no diffusers extension point, so we use
torch's forward hooks, registered on entry and removed in ``finally``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

Reducer = Callable[[torch.Tensor], torch.Tensor]


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``root`` at the diffusers module path ``path``.

    Raises
    ------
    KeyError
        If no such module exists; the message lists the closest valid paths.
    """
    modules = dict(root.named_modules())
    if path in modules:
        return modules[path]
    close = difflib.get_close_matches(path, list(modules), n=5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise KeyError(
        f"{type(root).__name__} has no module {path!r}.{hint} "
        "List valid paths with [name for name, _ in unet.named_modules()]."
    )


def block_paths(unet: nn.Module) -> list[str]:
    """The UNet's top-level blocks in data-flow order: down blocks, mid block, up blocks."""
    paths = [f"down_blocks.{i}" for i in range(len(getattr(unet, "down_blocks", [])))]
    if getattr(unet, "mid_block", None) is not None:
        paths.append("mid_block")
    paths += [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", [])))]
    return paths


#: Sub-layer lists inside a diffusers block that output a spatial feature map.
_LAYER_LISTS = ("resnets", "attentions")
_RESAMPLERS = ("downsamplers", "upsamplers")


def layer_paths(unet: nn.Module) -> list[str]:
    """Every resnet, attention and resampler inside the top-level blocks, in data-flow order.

    Within a block the pipeline runs ``resnets[i]`` then ``attentions[i]`` for each i, then
    the down- or upsampler; blocks follow :func:`block_paths`. This is the layer set the
    paper's DF-CAM code sums over.
    """
    paths: list[str] = []
    for block_path in block_paths(unet):
        block = resolve_module(unet, block_path)
        lists = [getattr(block, name, None) or [] for name in _LAYER_LISTS]
        for i in range(max(len(items) for items in lists)):
            paths += [
                f"{block_path}.{name}.{i}"
                for name, items in zip(_LAYER_LISTS, lists, strict=True)
                if i < len(items)
            ]
        for name in _RESAMPLERS:
            paths += [
                f"{block_path}.{name}.{i}" for i in range(len(getattr(block, name, None) or []))
            ]
    return paths


def _first_tensor(output: object) -> torch.Tensor:
    # Blocks return a tensor, a tuple (down blocks: hidden states + residuals) or a
    # BaseOutput; the block's main activation is always the first tensor.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if hasattr(output, "to_tuple"):
        return _first_tensor(output.to_tuple())
    raise TypeError(f"cannot read a tensor from a module output of type {type(output).__name__}")


@contextmanager
def capture_outputs(
    root: nn.Module,
    paths: Sequence[str],
    *,
    retain_grad: bool = False,
    reduce: Reducer | None = None,
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs of the modules at ``paths`` for every forward call inside the block.

    Parameters
    ----------
    root : nn.Module
        Usually ``pipe.unet``.
    paths : sequence of str
        Diffusers module paths, e.g. ``["down_blocks.1", "mid_block"]``.
    retain_grad : bool
        Keep ``.grad`` on the recorded tensors after a backward pass (DF-CAM).
    reduce : callable, optional
        Applied to each output before it is stored (e.g. spatial pooling), so that memory
        stays bounded over many steps. Not allowed together with ``retain_grad``.

    Yields
    ------
    dict of str to list of Tensor
        Path -> one entry per forward call, in call order.

    Examples
    --------
    >>> with capture_outputs(pipe.unet, ["mid_block"]) as acts:  # doctest: +SKIP
    ...     pipe("a red circle", num_inference_steps=2)
    >>> len(acts["mid_block"])  # doctest: +SKIP
    2
    """
    if retain_grad and reduce is not None:
        raise ValueError("retain_grad needs the raw outputs; pass reduce=None with it")
    modules = {path: resolve_module(root, path) for path in paths}
    records: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
    handles = []

    def make_hook(path: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = _first_tensor(output)
            if retain_grad:
                if tensor.requires_grad:
                    tensor.retain_grad()
                records[path].append(tensor)
            else:
                records[path].append(reduce(tensor.detach()) if reduce else tensor.detach())

        return hook

    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(path)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
