"""A ``torch.compile``'d denoiser for the many replays of one explanation (DF-RISE's masks).

Inductor's *freezing* folds the weights into the compiled code (packed for oneDNN, bias and
pointwise work fused into the convolutions and matrix products); on the embedded model on a
CPU it is most of what compilation gains (``bench/RESULTS_explain.md``). Frozen code keeps
the weights it was compiled with, so :class:`CompiledDenoiser` records what it compiled
(each parameter's storage and version counter, and the torch thread count, which the
compiled CPU kernels fix) and callers compile anew when that changed; the compiled code of
one wrapper is isolated from other ``torch.compile`` calls on the same module, so a new
wrapper never picks up stale frozen code.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch

#: Freezing (see the module docstring) and a C++ wrapper around the compiled kernels,
#: which saves Python work per call (about 8 % on the embedded model, one thread).
INDUCTOR_OPTIONS: dict[str, Any] = {"freezing": True, "cpp_wrapper": True}
#: Largest relative disagreement between the compiled and the eager denoiser on the same
#: input (max |difference| over max |eager|); reordered float32 sums stay near 1e-5.
COMPILE_TOLERANCE = 1e-3


def weights_key(module: Any) -> tuple[int, ...]:
    """Changes when a parameter or buffer of ``module`` is replaced or changed in place,
    or when torch's CPU thread count changes."""
    key = [torch.get_num_threads()]
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        key += (tensor.data_ptr(), tensor._version)
    return tuple(key)


class CompiledDenoiser:
    """``torch.compile(module, dynamic=False)`` with :data:`INDUCTOR_OPTIONS`; called as the module.

    Parameters
    ----------
    module : torch.nn.Module
        The denoiser. It is compiled on the first call, for the shapes of that call.

    Examples
    --------
    >>> compiled = CompiledDenoiser(pipe.unet)  # doctest: +SKIP
    >>> compiled.is_current(pipe.unet)  # doctest: +SKIP
    True
    """

    def __init__(self, module: Any) -> None:
        if "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
            raise RuntimeError(
                "compile=True needs a torch whose torch.compile has isolate_recompiles "
                f"(tested with 2.13; this is {torch.__version__}); use compile=False"
            )
        self.module = module
        self.key = weights_key(module)
        # Any: torch.compile's typed overloads do not list isolate_recompiles yet.
        compile_fn: Any = torch.compile
        self._wrapper = compile_fn(module, dynamic=False, isolate_recompiles=True)

    def is_current(self, module: Any) -> bool:
        """Whether this compiled ``module`` as it is now (same weights, same threads)."""
        return module is self.module and weights_key(module) == self.key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config

        # Compilation happens lazily inside the call: the options must be set there.
        with config.patch(INDUCTOR_OPTIONS):
            return self._wrapper(*args, **kwargs)


def disagreement(compiled: torch.Tensor, eager: torch.Tensor) -> float:
    """Max |compiled - eager| relative to max |eager|."""
    scale = float(eager.abs().max())
    return float((compiled - eager).abs().max()) / max(scale, 1e-12)
