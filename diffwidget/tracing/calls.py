"""The observer's own taps: every denoiser call and every scheduler step.

The pipeline's scheduler sees only the guided prediction; what a replay needs — the exact
arguments of each denoiser call (latent input, timestep as passed, text embeddings, pooled
projections, ``txt_ids``/``img_ids``, ``guidance``, added conditioning) and, for checks and
conditional previews, each call's output — is seen only by the denoiser itself.
:class:`CallTap` is a diffusers ``ModelHook`` in the denoiser's ``HookRegistry`` (the
extension point diffusers' own caching hooks use), so it also learns the ``cache_context``
name (``"cond"``/``"uncond"``) Flux-style pipelines give their separate CFG calls: the hook
is *stateful*, and diffusers hands the context to every stateful hook's ``StateManager``.

The text→image attention sites are read by capture processors that wrap the originals
(diffusers' attention-processor extension point): :class:`AttentionTap` installs the
family's :class:`~diffwidget.tracing.attention.AttentionCapture` and restores every
attention processor.

``scheduler.step`` is the only place that receives the guided model output, the timestep
and ``x_t`` together; a scheduler is no ``nn.Module`` and has no hook registry, so
:class:`StepTap` wraps ``step`` on the scheduler instance (an instance attribute that
shadows the class method for this object only) and puts the original back on removal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from diffusers.hooks.hooks import BaseState, StateManager

from diffwidget.tracing.attention import AttentionCapture
from diffwidget.tracing.families.base import DenoiserCall, first_tensor
from diffwidget.tracing.taps import LoopState, ModuleTap, StepEvent, Tap, TapKind

if TYPE_CHECKING:
    import torch

#: Names of the taps a trace installs.
CALL_TAP = "denoiser"
STEP_TAP = "scheduler.step"
ATTENTION_TAP = "attention"


class _NoState:
    """diffusers' ``StateManager`` wants a state class; the tap keeps none per context."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to reset."""


class CallTap(ModuleTap):
    """Calls ``before(call)`` before and ``after(call, output)`` after each denoiser call.

    Parameters
    ----------
    before : callable
        ``before(call: DenoiserCall) -> None`` before the denoiser runs (the family parses
        the arguments; ``call.label`` is the ``cache_context`` name or None).
    after : callable
        ``after(call, output) -> None`` with the denoiser's raw output tensor.
    """

    kind: ClassVar[TapKind] = "call"
    # Stateful hooks are the ones diffusers tells the current cache_context.
    _is_stateful = True

    def __init__(
        self,
        before: Callable[[DenoiserCall], None],
        after: Callable[[DenoiserCall, torch.Tensor], None],
    ) -> None:
        super().__init__("", CALL_TAP)
        self.before = before
        self.after = after
        # diffusers annotates the state class as an instance of BaseState.
        self.state = StateManager(cast("BaseState", _NoState))
        self.current: DenoiserCall | None = None

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Parse and report the call; the arguments go on unchanged."""
        assert self.loop is not None
        call = self.loop.family.parse_call(args, kwargs)
        context = self.state._context
        call.label = None if context is None else str(context.name)
        self.current = call
        self.before(call)
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        """Report the output; it goes on unchanged."""
        if self.current is not None:
            self.after(self.current, first_tensor(output))
        self.current = None
        return output

    def reset_state(self, module: Any) -> Any:
        """Forget the cache context."""
        self.state.reset()
        return module


class StepTap(Tap):
    """Wraps the scheduler's ``step``: ``before(model_output, timestep, sample)`` before it,
    ``after(event)`` with a :class:`~diffwidget.tracing.taps.StepEvent` after it.

    Parameters
    ----------
    scheduler : diffusers scheduler
        The pipeline's scheduler (its ``step`` is restored on removal).
    before, after : callable
        See above.
    """

    kind: ClassVar[TapKind] = "step"

    def __init__(
        self,
        scheduler: Any,
        before: Callable[[torch.Tensor, Any, torch.Tensor], None],
        after: Callable[[StepEvent], None],
    ) -> None:
        super().__init__(STEP_TAP)
        self.scheduler = scheduler
        self.before = before
        self.after = after
        self._had_instance_step = False
        self._original: Any = None

    def install(self, loop: LoopState) -> None:
        """Shadow ``scheduler.step`` with the wrapper on this scheduler object."""
        super().install(loop)
        scheduler = self.scheduler
        self._had_instance_step = "step" in vars(scheduler)
        original = self._original = scheduler.step

        def step(
            model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *a: Any, **k: Any
        ) -> Any:
            self.before(model_output, timestep, sample)
            out = original(model_output, timestep, sample, *a, **k)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            # The solver increments its step index in `step`: the sigma it used is the one before.
            index = getattr(scheduler, "step_index", None)
            sigma_index = None if index is None else int(index) - 1
            self.after(StepEvent(loop.step, timestep, sample, model_output, prev, sigma_index))
            return out

        scheduler.step = step

    def remove(self) -> None:
        """Put the scheduler's own ``step`` back."""
        if self._original is not None:
            if self._had_instance_step:
                self.scheduler.step = self._original
            else:
                vars(self.scheduler).pop("step", None)
            self._original = None
        super().remove()


class AttentionTap(Tap):
    """The text→image attention sites of a trace: installs and restores ``capture``."""

    kind: ClassVar[TapKind] = "attention"

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__(ATTENTION_TAP)
        self.capture = capture

    def paths(self) -> tuple[str, ...]:
        """The captured attention layers."""
        return tuple(self.capture.layers)

    def install(self, loop: LoopState) -> None:
        """Wrap every site's processor."""
        super().install(loop)
        self.capture.install()

    def remove(self) -> None:
        """Put every attention layer's original processor back."""
        try:
            self.capture.restore()
        finally:
            super().remove()
