"""``diffwidget.explain`` installs no hooks of its own: it observes through tracing's taps and
the families' methods (``capture_outputs``, ``explicit_attention``, ``text_attention``)."""

from __future__ import annotations

import ast
from pathlib import Path

EXPLAIN = Path(__file__).resolve().parents[2] / "diffwidget" / "explain"
#: Calls that attach something to a model, a module or a tensor.
HOOK_CALLS = frozenset(
    {
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_backward_hook",
        "register_module_forward_hook",
        "register_module_forward_pre_hook",
        "register_hook",
        "register_state_dict_pre_hook",
        "set_processor",
        "set_attn_processor",
        "set_attn_implementation",
        "set_default_attn_processor",
        "check_if_exists_or_initialize",
        "enable_attention_slicing",
        "setattr",
    }
)
#: Names whose use means a hook mechanism of its own.
HOOK_NAMES = frozenset({"HookRegistry", "ModelHook", "TorchFunctionMode", "TorchDispatchMode"})
#: Attributes that, assigned, patch a model, a processor or a scheduler.
PATCHED_ATTRIBUTES = frozenset({"forward", "step", "processor", "__call__", "_diffusers_hook"})


def hook_installations(source: str) -> list[str]:
    """``"line: what"`` for every hook installation in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in HOOK_CALLS:
                found.append(f"{node.lineno}: {name}()")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in HOOK_NAMES:
                found.append(f"{node.lineno}: {name}")
        elif isinstance(node, ast.alias) and node.name.rsplit(".", 1)[-1] in HOOK_NAMES:
            found.append(f"import {node.name}")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in PATCHED_ATTRIBUTES:
                    found.append(f"{node.lineno}: .{target.attr} = ...")
    return found


def test_the_check_finds_every_kind_of_hook() -> None:
    source = (
        "from diffusers.hooks import HookRegistry\n"
        "h = unet.mid_block.register_forward_hook(f)\n"
        "x.register_hook(g)\n"
        "attn.set_processor(p)\n"
        "scheduler.step = wrapped\n"
        "setattr(module, 'forward', f)\n"
    )
    assert len(hook_installations(source)) == 6
    assert hook_installations("y = replay.model_output(x, 3)\nt.retain_grad()\n") == []


def test_explain_installs_no_hooks() -> None:
    files = sorted(EXPLAIN.rglob("*.py"))
    assert files
    found = {
        str(path.relative_to(EXPLAIN)): hits
        for path in files
        if (hits := hook_installations(path.read_text()))
    }
    assert found == {}, (
        "explain/ must observe models through tracing taps or family methods "
        f"(diffwidget.tracing.taps / hooks / families): {found}"
    )
