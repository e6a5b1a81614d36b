"""Block taps: module outputs by their diffusers module paths, whole, reduced or pooled.

Attention goes through attention processors (see :mod:`diffwidget.tracing.attention`);
whole blocks (for DF-CAM, concept probes and a user's own measurements) are read by
:class:`BlockTap` and :class:`PooledBlockTap`, module taps
(:class:`~diffwidget.tracing.taps.ModuleTap`: a diffusers ``ModelHook`` on the block) that
an observer installs and always removes. Which blocks exist and which tensor of a block's
output is the image activation is the denoiser family's
(:meth:`~diffwidget.tracing.families.base.DenoiserFamily.cam_layers`, ``block_tensor``);
which rows of the batch are a CFG half is the trace's
:class:`~diffwidget.tracing.cfg.CfgLayout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from diffwidget.tracing.activation_record import POOLINGS, Pooling
from diffwidget.tracing.cfg import CfgLayout, Half
from diffwidget.tracing.taps import LoopState, ModuleTap, TapKind, TapRegistry

if TYPE_CHECKING:
    from diffwidget.tracing.families.base import DenoiserFamily, LatentLayout

Reducer = Callable[[torch.Tensor], torch.Tensor]
#: Picks the activation out of a module output: ``select(path, output) -> Tensor``.
Selector = Callable[[str, object], torch.Tensor]


class BlockTap(ModuleTap):
    """A block's output at every denoiser call: whole, one CFG half, and/or reduced.

    Parameters
    ----------
    path : str
        Diffusers module path, e.g. ``"mid_block"`` or ``"transformer_blocks.3"``.
    half : {"cond", "uncond"}, optional
        Keep only this CFG half's rows (asked of the loop's CFG layout; calls that do not
        hold the half are skipped). Default: the whole batch.
    reduce : callable, optional
        Applied to the (detached) tensor before it is stored, so that memory stays bounded
        over many steps (e.g. ``lambda t: t.norm()``). Not with ``retain_grad``.
    retain_grad : bool
        Keep the raw tensor in the autograd graph with ``.grad`` retained (DF-CAM).
    select : callable, optional
        ``select(path, output)`` picks the activation; default the family's
        ``block_tensor`` (SD3 and Flux blocks return ``(text, image)``).
    name : str, optional
        Tap name; default ``"block:<path>"``.

    Attributes
    ----------
    values : list of (int, Tensor)
        ``(step, value)`` per recorded call, in call order.

    Examples
    --------
    >>> norm = BlockTap("mid_block", half="cond", reduce=lambda t: t.norm())
    >>> with TraceContext(pipe, prompt="a red circle", taps=[norm]):  # doctest: +SKIP
    ...     pipe("a red circle", num_inference_steps=4)
    >>> [float(v) for _, v in norm.values]  # doctest: +SKIP
    [30.1, 29.7, 28.4, 27.9]
    """

    kind: ClassVar[TapKind] = "block"

    def __init__(
        self,
        path: str,
        *,
        half: Half | None = None,
        reduce: Reducer | None = None,
        retain_grad: bool = False,
        select: Selector | None = None,
        name: str | None = None,
    ) -> None:
        if retain_grad and reduce is not None:
            raise ValueError("retain_grad needs the raw outputs; pass reduce=None with it")
        if half not in (None, "cond", "uncond"):
            raise ValueError(f"half must be 'cond', 'uncond' or None, got {half!r}")
        super().__init__(path, name)
        self.half = half
        self.reduce = reduce
        self.retain_grad = retain_grad
        self.select = select
        self.values: list[tuple[int, Any]] = []

    def tensor(self, output: Any) -> torch.Tensor:
        """The activation in a module output (``select`` or the family's ``block_tensor``)."""
        assert self.loop is not None
        if self.select is not None:
            return self.select(self.path, output)
        return self.loop.family.block_tensor(self.path, output)

    def on_module_output(self, output: Any) -> None:
        """Store the (selected, reduced) activation of this call."""
        loop = self.loop
        assert loop is not None
        tensor = self.tensor(output)
        if self.half is not None:
            rows = loop.cfg.rows(self.half, tensor, loop.label)
            if rows is None:
                return
            tensor = rows
        if self.retain_grad:
            if tensor.requires_grad:
                tensor.retain_grad()
            self.values.append((loop.step, tensor))
            return
        tensor = tensor.detach()
        self.values.append((loop.step, self.reduce(tensor) if self.reduce else tensor))


class PooledBlockTap(BlockTap):
    """A block's output pooled over space per CFG half, on the CPU (concept probes).

    Each call stores ``{half: [prompts, features]}`` for the halves it holds (a batched call
    both, a separate call its own).

    Parameters
    ----------
    path : str
        Diffusers module path.
    layout : LatentLayout
        The run's latent layout (transformer tokens are laid on their patch grid).
    halves : sequence of {"cond", "uncond"}
        CFG halves to keep.
    pooling : {"mean", "grid"}
        ``"mean"``: spatial mean; ``"grid"``: adaptive average pooling to ``grid_size``
        cells a side (features ordered channel-major).
    grid_size : int
        Side of the pooling grid.
    dtype : torch.dtype
        Storage dtype.
    """

    kind: ClassVar[TapKind] = "pooled"

    def __init__(
        self,
        path: str,
        layout: LatentLayout,
        halves: Sequence[Half],
        *,
        pooling: Pooling = "mean",
        grid_size: int = 1,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
        super().__init__(path, name=name if name is not None else f"pooled:{path}")
        self.layout = layout
        self.halves = list(halves)
        self.pooling: Pooling = pooling
        self.grid_size = grid_size
        self.dtype = dtype

    def _pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            pooled = feature_map.float().mean(dim=(2, 3))
        else:
            pooled = F.adaptive_avg_pool2d(feature_map.float(), self.grid_size).flatten(1)
        return pooled.to(device="cpu", dtype=self.dtype)

    def on_module_output(self, output: Any) -> None:
        """Pool each kept half this call holds."""
        loop = self.loop
        assert loop is not None
        feature_map = loop.family.spatial(self.tensor(output).detach(), self.layout)
        pooled = {}
        for half in self.halves:
            rows = loop.cfg.rows(half, feature_map, loop.label)
            if rows is not None:
                pooled[half] = self._pool(rows)
        self.values.append((loop.step, pooled))


class BlockOutputs(Mapping[str, list[torch.Tensor]]):
    """Path -> the block taps' values so far, one per call (what :func:`capture_outputs`
    yields)."""

    def __init__(self, taps: Sequence[BlockTap]) -> None:
        self._taps = {tap.path: tap for tap in taps}

    def __getitem__(self, path: str) -> list[torch.Tensor]:
        return [value for _, value in self._taps[path].values]

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)


@contextmanager
def capture_outputs(
    family: DenoiserFamily,
    paths: Sequence[str],
    *,
    retain_grad: bool = False,
    reduce: Reducer | None = None,
    cfg: CfgLayout | None = None,
) -> Iterator[BlockOutputs]:
    """Record the outputs of the blocks at ``paths`` for every denoiser call inside the block.

    Block taps outside a traced pipeline call (a stateless replay, for DF-CAM); the taps are
    removed in ``finally``, also when the block raises.

    Parameters
    ----------
    family : DenoiserFamily
        The pipeline's family (its denoiser and ``block_tensor``).
    paths : sequence of str
        Diffusers module paths, e.g. ``["down_blocks.1", "mid_block"]``.
    retain_grad : bool
        Keep ``.grad`` on the recorded tensors after a backward pass (DF-CAM).
    reduce : callable, optional
        Applied to each output before it is stored. Not allowed together with ``retain_grad``.
    cfg : CfgLayout, optional
        The layout the calls run with (the whole batch is recorded either way).

    Yields
    ------
    BlockOutputs
        Path -> one entry per forward call, in call order.

    Examples
    --------
    >>> with capture_outputs(family, ["mid_block"]) as acts:  # doctest: +SKIP
    ...     replay.model_output(replay.latent(0), 0)
    >>> len(acts["mid_block"])  # doctest: +SKIP
    1
    """
    taps = [BlockTap(p, retain_grad=retain_grad, reduce=reduce) for p in dict.fromkeys(paths)]
    loop = LoopState(family, cfg if cfg is not None else CfgLayout("none", 1.0))
    with TapRegistry(taps).installed(loop):
        yield BlockOutputs(taps)
