"""Named taps on the denoising loop: the one way diffwidget observes a pipeline.

A *tap* is one named observation point. :class:`~diffwidget.tracing.context.TraceContext`
holds them in one :class:`TapRegistry`, installs them on entry, removes every one of them in
``finally`` (also when the pipeline raises) and tells each where the loop is (one shared
:class:`LoopState`: step, running call, CFG layout). A trace installs these:

============  ===================  ==========================================================
kind          name                 what it sees, and how it attaches
============  ===================  ==========================================================
``call``      ``denoiser``         each denoiser call's arguments, ``cache_context`` label and
                                   output: a diffusers ``ModelHook`` on the denoiser
``step``      ``scheduler.step``   ``x_t``, ``t``, the guided output and ``x_{t-1}``: the
                                   scheduler instance's ``step`` (a scheduler is no module)
``attention`` ``attention``        the text→image attention sites: capture processors that
                                   wrap the originals (diffusers' processor extension point)
``decode``    ``vae.decode``       the pipeline's own VAE decode of the final latent, which the
                                   previews' latent→RGB map is fitted on (with previews on)
============  ===================  ==========================================================

and a user adds more (TransformerLens' hook points, diffusers' ``HookRegistry``):

* ``block`` (:class:`~diffwidget.tracing.hooks.BlockTap`): a block's output, whole or
  reduced, per call — e.g. the norm of ``mid_block``'s output at every step;
* ``pooled`` (:class:`~diffwidget.tracing.hooks.PooledBlockTap`): a block's output pooled
  over space per CFG half (concept probes);
* ``loop`` (:class:`StepCallbackTap`): a function called after each step (a progress bar;
  raising from it stops the loop, e.g. a cancel button);
* any subclass of :class:`Tap` that overrides the loop events :meth:`Tap.on_call`,
  :meth:`Tap.on_output` and :meth:`Tap.on_step`, or of :class:`ModuleTap` for a module's
  input or output.

Every module tap is a diffusers ``ModelHook`` registered in the module's ``HookRegistry``
under ``"diffwidget:<tap name>"``; removing it also removes the registry and the
``forward`` attribute the registry added, when they were not there before.

Examples
--------
>>> from diffwidget.testing.tiny import tiny_sd_pipeline
>>> from diffwidget.tracing.context import TraceContext
>>> from diffwidget.tracing.hooks import BlockTap
>>> pipe = tiny_sd_pipeline()
>>> norm = BlockTap("mid_block", reduce=lambda t: t.norm(), name="mid_norm")
>>> ctx = TraceContext(pipe, prompt="a red circle", taps=[norm])
>>> ctx.taps.names()
['denoiser', 'scheduler.step', 'attention', 'vae.decode', 'mid_norm']
>>> with ctx:
...     _ = pipe("a red circle", num_inference_steps=3, output_type="np")
>>> [step for step, _ in norm.values]
[0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from diffusers.hooks import ModelHook

from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.model_hooks import (
    HOOK_PREFIX,
    attach_hook,
    detach_hook,
    forget_child_registries,
    resolve_module,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from diffwidget.tracing.families.base import DenoiserCall, DenoiserFamily

TapKind = Literal["call", "step", "attention", "decode", "block", "pooled", "loop"]
TAP_KINDS: tuple[str, ...] = get_args(TapKind)


@dataclass
class LoopState:
    """Where the denoising loop is: shared by every tap of one observer.

    Attributes
    ----------
    family : DenoiserFamily
        The pipeline's denoiser family.
    cfg : CfgLayout
        The CFG layout: asks which rows of a call are the prompt's (``cfg.rows``).
    step : int
        Loop index: scheduler steps finished so far.
    call : DenoiserCall, optional
        The denoiser call running now (its ``label`` is its ``cache_context`` name).
    n_calls : int
        Denoiser calls started so far.
    """

    family: DenoiserFamily
    cfg: CfgLayout
    step: int = 0
    call: DenoiserCall | None = None
    n_calls: int = 0

    @property
    def label(self) -> str | None:
        """The running call's ``cache_context`` name (``"cond"``/``"uncond"``), if any."""
        return None if self.call is None else self.call.label


@dataclass(frozen=True)
class StepEvent:
    """One scheduler step, as :meth:`Tap.on_step` sees it (after the step ran).

    Attributes
    ----------
    step : int
        Loop index.
    timestep : Tensor
        The scheduler timestep ``t`` passed to ``scheduler.step``.
    sample : Tensor
        ``x_t`` as the scheduler received it (the whole batch; packed for Flux).
    model_output : Tensor
        The guided model output the scheduler stepped with.
    prev : Tensor
        ``x_{t-1}`` the scheduler returned.
    sigma_index : int, optional
        Index into the scheduler's sigmas used by this step (None for schedulers that keep
        no step index).
    """

    step: int
    timestep: torch.Tensor
    sample: torch.Tensor
    model_output: torch.Tensor
    prev: torch.Tensor
    sigma_index: int | None


@dataclass(frozen=True)
class TapInfo:
    """One row of :meth:`TapRegistry.table`: a tap's name, kind and module paths."""

    name: str
    kind: TapKind
    paths: tuple[str, ...]


class Tap:
    """One named observation point of the denoising loop (subclass it to add one).

    A tap is told the loop's events by the observer it is registered with; override the
    ones you need. ``self.loop`` is the shared :class:`LoopState` while installed.

    Parameters
    ----------
    name : str
        Unique among the observer's taps.
    """

    kind: ClassVar[TapKind] = "loop"

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tap needs a non-empty name, got {name!r}")
        self.name = name
        self.loop: LoopState | None = None

    def paths(self) -> tuple[str, ...]:
        """Module paths (of the denoiser) the tap attaches to; empty for loop-event taps."""
        return ()

    def install(self, loop: LoopState) -> None:
        """Attach to the model (nothing for a loop-event tap)."""
        self.loop = loop

    def remove(self) -> None:
        """Detach; must be safe to call when :meth:`install` failed half-way."""
        self.loop = None

    def on_call(self, call: DenoiserCall) -> None:
        """Before each denoiser call (``self.loop.call`` is ``call``)."""

    def on_output(self, call: DenoiserCall, output: torch.Tensor) -> None:
        """After each denoiser call, with its raw output tensor."""

    def on_step(self, event: StepEvent) -> None:
        """After each scheduler step."""

    def info(self) -> TapInfo:
        """This tap's row of :meth:`TapRegistry.table`."""
        return TapInfo(self.name, self.kind, self.paths())


class StepCallbackTap(Tap):
    """Calls ``callback(steps_done)`` after each scheduler step: a progress bar's tap.

    The callback may raise to stop the loop (a cancel button); the observer still removes
    every tap, and the exception leaves the pipeline call.

    Parameters
    ----------
    callback : callable
        ``callback(steps_done)``, ``steps_done`` counting from 1.
    name : str
        Tap name.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> from diffwidget.tracing.generate import trace
    >>> done = []
    >>> _ = trace(tiny_sd_pipeline(), "a red circle", num_inference_steps=3,
    ...           taps=[StepCallbackTap(done.append)])
    >>> done
    [1, 2, 3]
    """

    def __init__(self, callback: Callable[[int], object], name: str = "step_callback") -> None:
        super().__init__(name)
        self.callback = callback

    def on_step(self, event: StepEvent) -> None:
        """Report the steps done so far."""
        self.callback(event.step + 1)


class ModuleTap(Tap, ModelHook):
    """A tap on one module of the denoiser (or of ``root``): a diffusers ``ModelHook``.

    Subclasses override :meth:`on_input` and/or :meth:`on_module_output`.

    Parameters
    ----------
    path : str
        Diffusers module path under the root (``""`` is the root itself).
    name : str, optional
        Tap name; default ``"<kind>:<path>"``.
    root : nn.Module, optional
        The module ``path`` is under; default the denoiser of the observed pipeline.
    """

    kind: ClassVar[TapKind] = "block"

    def __init__(
        self, path: str, name: str | None = None, *, root: nn.Module | None = None
    ) -> None:
        Tap.__init__(self, name if name is not None else f"{self.kind}:{path}")
        ModelHook.__init__(self)
        self.path = path
        self.root = root
        self._module: nn.Module | None = None
        self._had: tuple[bool, bool] = (False, False)

    def paths(self) -> tuple[str, ...]:
        """The module path."""
        return (self.path,)

    def install(self, loop: LoopState) -> None:
        """Register this hook on the module at :attr:`path`."""
        super().install(loop)
        root = self.root if self.root is not None else loop.family.denoiser
        try:
            module = root.get_submodule(self.path)
        except AttributeError:
            module = resolve_module(root, self.path)  # raises, naming the closest paths
        self._had = (hasattr(module, "_diffusers_hook"), "forward" in vars(module))
        self._module = module
        attach_hook(module, self, HOOK_PREFIX + self.name)

    def remove(self) -> None:
        """Unregister the hook (and the registry it created)."""
        module, self._module = self._module, None
        if module is not None:
            had_registry, had_forward = self._had
            detach_hook(
                module, HOOK_PREFIX + self.name, had_registry=had_registry, had_forward=had_forward
            )
        super().remove()

    def on_input(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """The module's arguments before it runs."""

    def on_module_output(self, output: Any) -> None:
        """The module's output after it ran."""

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """diffusers' hook: report the arguments; they go on unchanged."""
        self.on_input(args, kwargs)
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        """diffusers' hook: report the output; it goes on unchanged."""
        self.on_module_output(output)
        return output


class TapRegistry:
    """The taps of one observer, by name: listed, installed together, always removed.

    Parameters
    ----------
    taps : sequence of Tap
        Initial taps, in installation order.

    Examples
    --------
    >>> registry = TapRegistry([Tap("a"), Tap("b")])
    >>> registry.names()
    ['a', 'b']
    >>> registry.table()[0]
    TapInfo(name='a', kind='loop', paths=())
    """

    def __init__(self, taps: Sequence[Tap] = ()) -> None:
        self._taps: dict[str, Tap] = {}
        self._installed: list[Tap] = []
        self._root: nn.Module | None = None
        self._root_had_registry = False
        for tap in taps:
            self.add(tap)

    def add(self, tap: Tap) -> Tap:
        """Register ``tap`` (before installation); returns it.

        Raises
        ------
        ValueError
            For a name already taken; RuntimeError while the taps are installed.
        """
        if not isinstance(tap, Tap):
            raise TypeError(
                f"expected a Tap (diffwidget.tracing.taps.Tap or a subclass), got "
                f"{type(tap).__name__}"
            )
        if self._installed:
            raise RuntimeError("add taps before the observer is entered, not inside it")
        if tap.name in self._taps:
            raise ValueError(
                f"a tap named {tap.name!r} is already registered ({self.names()}); give it "
                "another name (name=...)"
            )
        self._taps[tap.name] = tap
        return tap

    def names(self, kind: TapKind | None = None) -> list[str]:
        """Tap names in installation order (of one ``kind`` if given)."""
        return [n for n, t in self._taps.items() if kind is None or t.kind == kind]

    def table(self) -> list[TapInfo]:
        """Name, kind and module paths of every tap."""
        return [tap.info() for tap in self._taps.values()]

    def __getitem__(self, name: str) -> Tap:
        if name not in self._taps:
            raise KeyError(f"no tap {name!r}; taps: {self.names()}")
        return self._taps[name]

    def __contains__(self, name: object) -> bool:
        return name in self._taps

    def __iter__(self) -> Iterator[Tap]:
        return iter(self._taps.values())

    def __len__(self) -> int:
        return len(self._taps)

    # ------------------------------------------------------------------ install/remove
    def install(self, loop: LoopState) -> None:
        """Install every tap in order; on a failure the installed ones are removed again."""
        if self._installed:
            raise RuntimeError("these taps are installed already; remove them first")
        self._root = loop.family.denoiser
        # Only a registry that was there before may hold a stale list of child registries.
        self._root_had_registry = hasattr(self._root, "_diffusers_hook")
        try:
            for tap in self._taps.values():
                self._installed.append(tap)
                tap.install(loop)
        except BaseException:
            self.remove()
            raise
        if self._root_had_registry:
            forget_child_registries(self._root)

    def remove(self) -> None:
        """Remove every installed tap, last first; every removal is tried, the first error
        is raised afterwards."""
        error: BaseException | None = None
        while self._installed:
            tap = self._installed.pop()
            try:
                tap.remove()
            except BaseException as exc:  # the others must still be removed
                error = error or exc
        if self._root_had_registry:
            forget_child_registries(self._root)
        if error is not None:
            raise error

    @contextmanager
    def installed(self, loop: LoopState) -> Iterator[TapRegistry]:
        """The taps installed inside the block, removed in ``finally``."""
        self.install(loop)
        try:
            yield self
        finally:
            self.remove()

    # ------------------------------------------------------------------ events
    def on_call(self, call: DenoiserCall) -> None:
        """Tell every tap about a denoiser call."""
        for tap in self._installed:
            tap.on_call(call)

    def on_output(self, call: DenoiserCall, output: torch.Tensor) -> None:
        """Tell every tap a denoiser call's output."""
        for tap in self._installed:
            tap.on_output(call, output)

    def on_step(self, event: StepEvent) -> None:
        """Tell every tap about a finished scheduler step."""
        for tap in self._installed:
            tap.on_step(event)
