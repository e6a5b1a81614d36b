"""Observing every denoiser call of a pipeline run, through a diffusers ``ModelHook``.

The pipeline's scheduler sees only the guided prediction; what a replay needs — the exact
arguments of each denoiser call (latent input, timestep as passed, text embeddings, pooled
projections, ``txt_ids``/``img_ids``, ``guidance``, added conditioning) and, for checks and
conditional previews, each call's output — is seen only by the denoiser itself. A
:class:`CallRecorder` is registered in the denoiser's diffusers ``HookRegistry`` (the
extension point diffusers' own caching hooks use), so it also learns the
``cache_context`` name (``"cond"``/``"uncond"``) Flux-style pipelines give their separate
CFG calls: the hook is *stateful*, and diffusers hands the context to every stateful hook's
``StateManager``. :func:`record_calls` installs it and removes it in ``finally``, leaving
the module as it found it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from diffwidget.tracing.families.base import DenoiserCall, DenoiserFamily, first_tensor

if TYPE_CHECKING:
    from torch import nn

HOOK_NAME = "diffwidget_call_recorder"


class _NoState:
    """diffusers' ``StateManager`` wants a state class; the recorder keeps none per context."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to reset."""


class CallRecorder(ModelHook):
    """Calls ``on_call(call)`` before and ``on_output(call, output)`` after each denoiser call.

    Parameters
    ----------
    family : DenoiserFamily
        Parses the call's arguments.
    on_call : callable
        ``on_call(call: DenoiserCall) -> None`` before the denoiser runs.
    on_output : callable, optional
        ``on_output(call, output) -> None`` with the denoiser's raw output tensor.
    """

    # Stateful hooks are the ones diffusers tells the current cache_context.
    _is_stateful = True

    def __init__(
        self,
        family: DenoiserFamily,
        on_call: Callable[[DenoiserCall], None],
        on_output: Callable[[DenoiserCall, Any], None] | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.on_call = on_call
        self.on_output = on_output
        self.state = StateManager(_NoState)  # type: ignore[arg-type]
        self.current: DenoiserCall | None = None

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Parse and report the call; the arguments go on unchanged."""
        call = self.family.parse_call(args, kwargs)
        context = self.state._context
        call.label = None if context is None else str(context.name)
        self.current = call
        self.on_call(call)
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        """Report the output; it goes on unchanged."""
        if self.on_output is not None and self.current is not None:
            self.on_output(self.current, first_tensor(output))
        self.current = None
        return output

    def reset_state(self, module: Any) -> Any:
        """Forget the cache context."""
        self.state.reset()
        return module


@contextmanager
def record_calls(
    family: DenoiserFamily,
    on_call: Callable[[DenoiserCall], None],
    on_output: Callable[[DenoiserCall, Any], None] | None = None,
) -> Iterator[None]:
    """Observe the family's denoiser inside the block; everything is removed in ``finally``."""
    module: nn.Module = family.denoiser
    had_registry = hasattr(module, "_diffusers_hook")
    had_forward = "forward" in vars(module)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        raise RuntimeError(
            "this denoiser is already being traced (a TraceContext is active on it); leave "
            "that context before starting another"
        )
    registry.register_hook(CallRecorder(family, on_call, on_output), HOOK_NAME)
    try:
        yield
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
        # The registry replaced `forward` with an instance attribute and lives on the module:
        # leave neither behind when they were not there before.
        if not had_forward:
            vars(module).pop("forward", None)
        if not had_registry and not registry.hooks:
            del module._diffusers_hook
