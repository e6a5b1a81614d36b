"""What decides a run's results: the settings record, the model's fingerprint and the digests.

:class:`RunSettings` is stored in the run manifest and compared when a run is resumed. Its
:meth:`~RunSettings.digest` is computed here and nowhere else, over every field that decides
an item's numbers (the model and a fingerprint of its weights, the methods and their
settings, the steps, the metrics, the seed rule); each item record carries the digest of the
work that produced it (:func:`work_digest`), so a record made under other settings, or for
another prompt, is never taken for this run's.

The methods' own settings are one field today (``rise_masks``, DF-RISE's masks per map); when
methods are configured objects their typed configs take its place here, and the digest
follows, since it covers every field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffwidget.explain.attention import AttentionMaps
from diffwidget.records import JsonValue, Record
from diffwidget.runs.metrics import (
    DEFAULT_METHODS,
    DEFAULT_METRICS,
    MAP_METHODS,
    METRICS,
    default_steps,
)
from diffwidget.runs.prompts import SEED_MODULUS, PromptItem

MapMethod = Literal["attention", "df_rise", "df_cam"]
Metric = Literal["faithfulness", "segmentation", "roles", "probes"]
#: How an item's generator seed follows from its id and offset (``PromptItem.generator_seed``).
SEED_RULE = f"crc32(id) or the given seed, plus the offset, modulo {SEED_MODULUS}"
#: Fields that say which items a run holds, not what an item's numbers are.
_NOT_RESULTS = frozenset({"seeds"})
#: Files larger than this are fingerprinted by their size, head and tail, not read whole.
_WHOLE_FILE_BYTES = 64 * 2**20
_HEAD_TAIL_BYTES = 2**20


@dataclass(frozen=True)
class AttentionDefaults(Record):
    """``AttentionMaps()``'s defaults, which the segmentation and role metrics depend on."""

    layers: list[str] | None
    resolution: JsonValue
    window: tuple[float, float]
    normalize: str

    @classmethod
    def current(cls) -> AttentionDefaults:
        """The defaults of the installed ``AttentionMaps``."""
        maps = AttentionMaps()
        resolution = maps.resolution
        return cls(
            layers=maps.layers,
            resolution=list(resolution) if isinstance(resolution, tuple) else resolution,
            window=maps.window,
            normalize=maps.normalize,
        )


@dataclass(frozen=True)
class RunSettings(Record):
    """Everything that decides an item's results (stored in the run manifest).

    Attributes
    ----------
    methods : tuple of {"attention", "df_rise", "df_cam"}
        Maps computed at every explained step.
    steps : tuple of int
        Loop indices explained (default :func:`~diffwidget.runs.metrics.default_steps`).
    seeds : tuple of int
        Seed offsets; each item runs once per offset (see ``PromptItem.generator_seed``).
    inference_steps : int
        Denoising steps of each generation.
    guidance : float, optional
        CFG scale; default the pipeline's recommended one.
    model : str, optional
        ``"unet"`` or ``"dit"`` (an embedded model), a local diffusers pipeline folder, or
        ``"<Pipeline passed in>"``; ``None`` is the embedded UNet.
    rise_masks : int
        DF-RISE masks per map (the methods' settings).
    n_random : int
        Random orders of the faithfulness baseline.
    cells_per_stage : int, optional
        Latent cells removed or restored per faithfulness stage (default: the paper's 64 of
        4096, scaled to the grid).
    metrics : tuple of {"faithfulness", "segmentation", "roles", "probes"}
        Metrics computed per item.
    save_traces : bool
        Keep each item's Trace (needed to open its explorer).
    attention_defaults : AttentionDefaults
        ``AttentionMaps()``'s defaults when the run started.
    scene_metrics : bool, optional
        Whether scene-world captions are scored against the image (``None``: not recorded,
        runs written before it was).
    model_fingerprint : str
        :func:`folder_fingerprint` or :func:`pipeline_fingerprint` of the model (``""``: not
        recorded).

    Examples
    --------
    >>> settings = RunSettings(inference_steps=4)
    >>> settings.steps, len(settings.digest())
    ((3,), 64)
    """

    methods: tuple[MapMethod, ...] = DEFAULT_METHODS  # type: ignore[assignment]
    steps: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    inference_steps: int = 20
    guidance: float | None = None
    model: str | None = None
    rise_masks: int = 500
    n_random: int = 3
    cells_per_stage: int | None = None
    metrics: tuple[Metric, ...] = DEFAULT_METRICS  # type: ignore[assignment]
    save_traces: bool = True
    attention_defaults: AttentionDefaults = field(default_factory=AttentionDefaults.current)
    scene_metrics: bool | None = None
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        for name in ("methods", "steps", "seeds", "metrics"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.steps is None and self.inference_steps >= 1:
            object.__setattr__(self, "steps", tuple(default_steps(self.inference_steps)))

    @property
    def explained_steps(self) -> list[int]:
        """The loop indices explained (``steps`` after defaults)."""
        return list(self.steps or ())

    def checked(self) -> RunSettings:
        """These settings validated for a new run, duplicates dropped and steps sorted.

        Raises
        ------
        ValueError
            For an unknown method or metric, steps outside the run, bad seeds or counts, or
            a model folder that is not a pipeline; the message says how to fix it.
        """
        if self.inference_steps < 1:
            raise ValueError(f"inference steps must be at least 1, got {self.inference_steps}")
        steps = self.explained_steps
        bad = [s for s in steps if not 0 <= s < self.inference_steps]
        if bad or not steps:
            raise ValueError(
                f"explained steps {bad or steps} must be loop indices in "
                f"0..{self.inference_steps - 1} (not scheduler timesteps)"
            )
        if not self.seeds or any(type(s) is not int or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {list(self.seeds)}")
        if self.rise_masks < 1 or self.n_random < 1:
            raise ValueError("rise_masks and n_random must be at least 1")
        if self.cells_per_stage is not None and self.cells_per_stage < 1:
            raise ValueError(f"cells_per_stage must be at least 1, got {self.cells_per_stage}")
        if self.guidance is not None and not self.guidance > 1:
            raise ValueError(
                f"guidance must be above 1 (classifier-free guidance), got {self.guidance}"
            )
        _check_model(self.model)
        return self.replace(
            methods=tuple(_choices("method", self.methods, MAP_METHODS)),
            metrics=tuple(_choices("metric", self.metrics, METRICS)) if self.metrics else (),
            steps=tuple(sorted(set(steps))),
            seeds=tuple(dict.fromkeys(self.seeds)),
        )

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """SHA-256 of every field that decides an item's numbers, and of the seed rule.

        The seed offsets are left out: they say which items the run holds, and each item
        record carries its own seed.
        """
        results = {k: v for k, v in self.to_json().items() if k not in _NOT_RESULTS}
        return _sha256({"settings": results, "seed_rule": SEED_RULE})

    def differences(self, other: RunSettings) -> list[str]:
        """``"name: <here> there, <other> now"`` for each field that differs."""
        mine, theirs = self.to_json(), other.to_json()
        return [
            f"{name}: {mine[name]!r} there, {theirs[name]!r} now"
            for name in mine
            if mine[name] != theirs[name]
        ]


def _choices(kind: str, given: Sequence[str], allowed: Sequence[str]) -> list[str]:
    given = list(given)
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {kind} {name!r}.{hint} Choose from {list(allowed)}")
    if not given:
        raise ValueError(f"choose at least one {kind} from {list(allowed)}")
    return list(dict.fromkeys(given))


def _check_model(model: str | None) -> None:
    from diffwidget.models.loader import DEMO_MODELS

    if model is None or model in DEMO_MODELS:
        return
    if not (Path(model).expanduser() / "model_index.json").is_file():
        raise ValueError(
            f"model {model} is not a diffusers pipeline folder (no model_index.json); "
            "save one with pipe.save_pretrained(folder), or name an embedded model "
            f"({' or '.join(DEMO_MODELS)}; unset: unet)"
        )


def work_digest(settings_digest: str, item: PromptItem, offset: int) -> str:
    """SHA-256 of one unit of work: the settings' digest, the prompt item and its offset.

    Examples
    --------
    >>> a = work_digest("s", PromptItem("p", "a red circle"), 0)
    >>> a == work_digest("s", PromptItem("p", "a blue circle"), 0)
    False
    """
    return _sha256({"settings": settings_digest, "item": item.to_json(), "offset": offset})


def _sha256(data: JsonValue) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _file_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _WHOLE_FILE_BYTES:
            for block in iter(lambda: handle.read(_HEAD_TAIL_BYTES), b""):
                digest.update(block)
        else:  # weights of a large model: its size, first and last MiB tell retrained ones apart
            digest.update(handle.read(_HEAD_TAIL_BYTES))
            handle.seek(size - _HEAD_TAIL_BYTES)
            digest.update(handle.read(_HEAD_TAIL_BYTES))
    return digest.hexdigest()


def folder_fingerprint(folders: Iterable[Path]) -> str:
    """A fingerprint of the files of a pipeline folder (configs and weights).

    Every file is hashed whole up to 64 MiB; a larger one by its size and its first and
    last MiB, so that a multi-gigabyte model is fingerprinted in well under a second.
    Hidden files are left out; names of the folders and file times are not part of it (a
    copy fingerprints alike).

    Examples
    --------
    >>> from diffwidget.models.loader import DEMO_DIR
    >>> len(folder_fingerprint([DEMO_DIR]))
    64
    """
    entries: list[JsonValue] = []
    for index, folder in enumerate(folders):
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            hidden = any(p.startswith(".") or p == "__pycache__" for p in relative.parts)
            if path.is_file() and not hidden:
                size = path.stat().st_size
                entries.append([index, relative.as_posix(), size, _file_digest(path, size)])
    return _sha256(entries)


def pipeline_fingerprint(pipe: Any) -> str:
    """A fingerprint of a pipeline object's weights: every tensor's name, shape, dtype and
    bytes (copied to the CPU one at a time, so it does not depend on the device)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(getattr(pipe, "components", {}) or {}):
        module = pipe.components[name]
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor_name, tensor in sorted(module.state_dict().items()):
            value = tensor.detach().cpu().contiguous()
            digest.update(repr((name, tensor_name, tuple(value.shape), str(value.dtype))).encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: str | None, pipe: Any = None) -> str:
    """The fingerprint of what a run computes with: a pipeline passed in, an embedded model,
    or a local pipeline folder."""
    if pipe is not None:
        return pipeline_fingerprint(pipe)
    from diffwidget.models.loader import DEMO_DIR, DEMO_DIRS, SHARED_VAE_DIR

    if model is None or model in DEMO_DIRS:
        folder = DEMO_DIRS[model or "unet"]
        # The embedded DiT loads the UNet's VAE: its folder and that VAE make the model.
        return folder_fingerprint([folder] if folder == DEMO_DIR else [folder, SHARED_VAE_DIR])
    return folder_fingerprint([Path(model).expanduser()])
