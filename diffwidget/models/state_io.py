"""Training state on disk without pickle: tensors in one safetensors file, the rest as JSON.

A resume file or an encoded training set may come from someone else (a shared run folder);
``torch.load`` without ``weights_only`` would run whatever code its pickle names. Here the
tensors are safetensors arrays and everything around them (nested dicts, lists, numbers,
strings: optimiser settings, step counters, captions) is JSON in the file's metadata, where a
tensor stands as ``{"$tensor": name}``. Reading parses that JSON with a depth guard and
rebuilds only dicts, lists, plain values and tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget.records import RecordError, parse_json

if TYPE_CHECKING:
    import torch

#: Metadata key of the JSON skeleton.
STATE_KEY = "diffwidget_state"
_TENSOR = "$tensor"
_ITEMS = "$items"  # a dict whose keys are not all strings (optimiser state is keyed by int)


class StateFileError(RecordError):
    """A training-state file that cannot be read; the message names the file and the part."""


def _split(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        # safetensors refuses views of shared storage: store an independent contiguous copy.
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _split(v, tensors) for k, v in value.items()}
        return {_ITEMS: [[k, _split(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"training state cannot hold a {type(value).__name__}")


def save_state(state: Any, path: str | Path) -> Path:
    """Write ``state`` (dicts, lists, numbers, strings, tensors) atomically to ``path``.

    Examples
    --------
    >>> import torch
    >>> path = save_state({"step": 3, "w": torch.ones(2)}, "resume.safetensors")  # doctest: +SKIP
    >>> load_state(path)["step"]  # doctest: +SKIP
    3
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_split(state, tensors))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={STATE_KEY: skeleton})
    os.replace(tmp, path)
    return path


def load_state(path: str | Path, device: str = "cpu") -> Any:
    """Read what :func:`save_state` wrote (tensors on ``device``); no code runs.

    Raises
    ------
    StateFileError
        When the file is not a training-state file or its JSON names a missing tensor.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            if STATE_KEY not in metadata:
                raise StateFileError(path, "a safetensors file without diffwidget's state")
            skeleton = parse_json(metadata[STATE_KEY], path, error=StateFileError)
            names = set(handle.keys())

            def join(value: Any, where: str) -> Any:
                if isinstance(value, list):
                    return [join(v, f"{where}[{i}]") for i, v in enumerate(value)]
                if not isinstance(value, dict):
                    return value
                if set(value) == {_TENSOR}:
                    if value[_TENSOR] not in names:
                        raise StateFileError(path, "names a missing tensor", field=where)
                    return handle.get_tensor(value[_TENSOR])
                if set(value) == {_ITEMS}:
                    pairs = value[_ITEMS]
                    if not isinstance(pairs, list) or any(
                        not isinstance(p, list) or len(p) != 2 or not isinstance(p[0], (int, str))
                        for p in pairs
                    ):
                        raise StateFileError(path, "should be [key, value] pairs", field=where)
                    return {k: join(v, f"{where}[{k!r}]") for k, v in pairs}
                return {k: join(v, f"{where}[{k!r}]") for k, v in value.items()}

            return join(skeleton, "state")
    except SafetensorError as error:
        raise StateFileError(path, f"not a readable safetensors file ({error})") from None
