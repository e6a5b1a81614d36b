"""Reading module outputs by their diffusers module paths, with hooks that always go away.

Attention goes through attention processors (see :mod:`diffwidget.tracing.attention`);
whole blocks (for DF-CAM and concept probes) have no diffusers extension point, so we use
torch's forward hooks, registered on entry and removed in ``finally``. Which blocks exist
and which tensor of a block's output is the image activation is the denoiser family's
(:meth:`~diffwidget.tracing.families.base.DenoiserFamily.cam_layers`, ``block_tensor``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from diffwidget.tracing.families.base import first_tensor

Reducer = Callable[[torch.Tensor], torch.Tensor]
#: Picks the activation out of a module output: ``select(path, output) -> Tensor``.
Selector = Callable[[str, object], torch.Tensor]


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


@contextmanager
def capture_outputs(
    root: nn.Module,
    paths: Sequence[str],
    *,
    retain_grad: bool = False,
    reduce: Reducer | None = None,
    select: Selector | None = None,
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
    select : callable, optional
        ``select(path, output)`` picks the activation from a module's output (a family's
        ``block_tensor``: SD3 and Flux blocks return ``(text, image)``); default the first
        tensor.

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

    pick: Selector = select if select is not None else (lambda _path, out: first_tensor(out))

    def make_hook(path: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = pick(path, output)
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
