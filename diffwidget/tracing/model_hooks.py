"""Attaching diffusers ``ModelHook`` objects to modules by path, and leaving nothing behind.

The one hook mechanism diffwidget uses on modules (:mod:`diffwidget.tracing.taps` builds its
module taps on it; the joint families' projection taps and the text encoder's attention
taps use it directly): a hook in the module's diffusers ``HookRegistry``, under a name
starting with :data:`HOOK_PREFIX`. Removing it also removes the registry and the ``forward``
attribute the registry added, when they were not there before.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from diffusers.hooks import HookRegistry, ModelHook

if TYPE_CHECKING:
    from torch import nn

#: Prefix of the names diffwidget's hooks have in a diffusers ``HookRegistry``.
HOOK_PREFIX = "diffwidget:"


def attach_hook(module: nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` in ``module``'s diffusers ``HookRegistry`` under ``name``.

    Raises
    ------
    RuntimeError
        When a hook of that name is already there (the module is being observed).
    """
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if name in registry.hooks:
        raise RuntimeError(
            f"{type(module).__name__} already has a hook {name!r}: this model is already being "
            "traced (a TraceContext is active on it); leave that context before starting another"
        )
    registry.register_hook(hook, name)


def detach_hook(module: nn.Module, name: str, *, had_registry: bool, had_forward: bool) -> None:
    """Remove the hook ``name`` and whatever registering it left on ``module``."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    # The registry replaced `forward` with an instance attribute and lives on the module:
    # leave neither behind when they were not there before.
    if not had_forward and not registry.hooks:
        vars(module).pop("forward", None)
    if not had_registry and not registry.hooks:
        del module._diffusers_hook


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


def forget_child_registries(root: nn.Module | None) -> None:
    """Drop the list of child registries diffusers caches on ``root``'s registry (it walks
    it to hand stateful hooks the ``cache_context``): module taps add and remove some."""
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
