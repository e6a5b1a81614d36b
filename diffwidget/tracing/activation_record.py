"""The result of :class:`~diffwidget.tracing.activations.ActivationRecorder`, and its file format.

A record holds, for each prompt and denoising step, the pooled output of a few UNet blocks
(conditional and/or unconditional CFG half), the final images and optionally the decoded x̂0 at
every step. It is saved to one ``.npz`` file whose JSON header keeps the prompts, seeds, block
paths and pooling.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from diffwidget.records import JsonValue, Record, RecordError, check_npz, parse_json, write_npz

Pooling = Literal["mean", "grid"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
Half = Literal["cond", "uncond"]
HALVES: tuple[str, ...] = get_args(Half)
FORMAT_VERSION = 1
_ACT_PREFIX = "act/"


@dataclass
class ActivationRecord:
    """Pooled activations of UNet blocks for a batch of prompts, one row per step.

    Attributes
    ----------
    prompts : list of str
        The prompts, one generated image each.
    seeds : list of int
        The generator seed of each prompt (``torch.Generator().manual_seed(seed)``).
    timesteps : ndarray of int64, shape (n_steps,)
        Scheduler timestep ``t_i`` of each loop index ``i`` (``step``).
    activations : dict of str to ndarray, shape (n_prompts, n_steps, n_features)
        Diffusers module path -> pooled output of the conditional CFG half (the prompt's
        half; the whole batch when the pipeline runs without CFG). With ``pooling="grid"``
        the features are ordered channel-major (``channel * grid_size**2 + row *
        grid_size + col``). Empty if only the unconditional half was recorded.
    uncond_activations : dict of str to ndarray
        The same for the unconditional half (empty unless requested). It never sees the
        prompt, so a concept decodable from it must already be in the latent ``x_t``.
    pooling : {"mean", "grid"}
        How each block output was pooled over space.
    grid_size : int
        Side of the pooling grid (1 for ``"mean"``).
    images : ndarray of uint8, shape (n_prompts, H, W, 3), optional
        The final images.
    x0_images : ndarray of uint8, shape (n_prompts, n_steps, H, W, 3), optional
        The decoded predicted clean image x̂0 at every step (``decode_x0=True``).
    meta : dict
        JSON-serialisable facts: pipeline and scheduler class, guidance scale, steps, size.
    """

    prompts: list[str]
    seeds: list[int]
    timesteps: np.ndarray
    activations: dict[str, np.ndarray]
    uncond_activations: dict[str, np.ndarray] = field(default_factory=dict)
    pooling: Pooling = "mean"
    grid_size: int = 1
    images: np.ndarray | None = None
    x0_images: np.ndarray | None = None
    meta: dict[str, JsonValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, steps = len(self.prompts), len(self.timesteps)
        if len(self.seeds) != n:
            raise ValueError(f"{len(self.seeds)} seeds for {n} prompts; pass one seed per prompt")
        if not self.activations and not self.uncond_activations:
            raise ValueError("an activation record needs at least one recorded block")
        for half in self.halves:
            for path, array in self._arrays(half).items():
                if array.ndim != 3 or array.shape[:2] != (n, steps):
                    raise ValueError(
                        f"{half} activations of {path!r} have shape {array.shape}, expected "
                        f"({n}, {steps}, n_features)"
                    )

    def _arrays(self, half: Half) -> dict[str, np.ndarray]:
        if half not in HALVES:
            raise ValueError(f"unknown half {half!r}; use one of {HALVES}")
        arrays = self.activations if half == "cond" else self.uncond_activations
        if not arrays:
            raise ValueError(
                f"the {half} half was not recorded (recorded: {self.halves}); record with "
                f"ActivationRecorder(halves=[..., {half!r}])"
            )
        return arrays

    @property
    def halves(self) -> list[Half]:
        """The CFG halves that were recorded."""
        recorded: list[Half] = []
        if self.activations:
            recorded.append("cond")
        if self.uncond_activations:
            recorded.append("uncond")
        return recorded

    @property
    def n_prompts(self) -> int:
        """Number of prompts recorded."""
        return len(self.prompts)

    @property
    def n_steps(self) -> int:
        """Number of denoising steps recorded."""
        return len(self.timesteps)

    @property
    def blocks(self) -> list[str]:
        """Recorded module paths, in recording order."""
        return list(self._arrays(self.halves[0]))

    def features(self, blocks: Sequence[str] | None = None, half: Half = "cond") -> np.ndarray:
        """Activations of ``blocks`` (default: all) concatenated along the feature axis.

        Parameters
        ----------
        blocks : sequence of str, optional
            Module paths to use; all recorded blocks by default.
        half : {"cond", "uncond"}
            Which CFG half.

        Returns
        -------
        ndarray of float32, shape (n_prompts, n_steps, n_features)
        """
        arrays = self._arrays(half)
        chosen = list(blocks) if blocks is not None else list(arrays)
        missing = [b for b in chosen if b not in arrays]
        if missing:
            raise KeyError(f"blocks {missing} were not recorded; recorded: {list(arrays)}")
        return np.concatenate([arrays[b].astype(np.float32) for b in chosen], axis=-1)

    def nbytes(self) -> int:
        """Bytes held by all arrays of the record."""
        arrays = [self.timesteps, *self.activations.values(), *self.uncond_activations.values()]
        arrays += [a for a in (self.images, self.x0_images) if a is not None]
        return sum(int(a.nbytes) for a in arrays)

    def save(self, path: str | Path) -> Path:
        """Write the record to one ``.npz`` file (arrays keep their dtype).

        Examples
        --------
        >>> path = record.save("acts.npz")  # doctest: +SKIP
        >>> ActivationRecord.load(path).n_steps  # doctest: +SKIP
        20
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz")
        header = ActivationHeader(
            prompts=list(self.prompts),
            seeds=[int(s) for s in self.seeds],
            blocks={half: list(self._arrays(half)) for half in self.halves},
            pooling=self.pooling,
            grid_size=int(self.grid_size),
            meta=self.meta,
        )
        # Module paths are kept in the JSON header (order included); array keys are indices.
        arrays = {
            f"{_ACT_PREFIX}{half}/{i}": array
            for half in self.halves
            for i, array in enumerate(self._arrays(half).values())
        }
        if self.images is not None:
            arrays["images"] = self.images
        if self.x0_images is not None:
            arrays["x0_images"] = self.x0_images
        path.parent.mkdir(parents=True, exist_ok=True)
        header_text = np.array(json.dumps(header.to_json()))
        return write_npz(path, {"header": header_text, "timesteps": self.timesteps, **arrays})

    @classmethod
    def load(cls, path: str | Path) -> ActivationRecord:
        """Read a record written by :meth:`save`; array sizes are checked before reading.

        Raises
        ------
        RecordError
            When the file is not an activation record or is damaged (naming the field).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no activation record at {path}; write one with .save(path)")
        check_npz(path)
        with np.load(path, allow_pickle=False) as data:
            if "header" not in data.files:
                raise RecordError(path, "an .npz file but not a diffwidget activation record")
            header = ActivationHeader.from_json(parse_json(str(data["header"]), path), where=path)
            if header.format_version > FORMAT_VERSION:
                raise RecordError(
                    path,
                    "written by a newer diffwidget",
                    "upgrade with `pip install -U diffwidget`",
                )
            names = [
                f"{_ACT_PREFIX}{half}/{i}"
                for half, b in header.blocks.items()
                for i in range(len(b))
            ]
            missing = [name for name in ["timesteps", *names] if name not in data.files]
            if missing:
                raise RecordError(path, f"arrays missing: {', '.join(missing)}")
            halves = {
                half: {b: data[f"{_ACT_PREFIX}{half}/{i}"] for i, b in enumerate(blocks)}
                for half, blocks in header.blocks.items()
            }
            try:
                return cls(
                    prompts=list(header.prompts),
                    seeds=list(header.seeds),
                    timesteps=data["timesteps"],
                    activations=halves.get("cond", {}),
                    uncond_activations=halves.get("uncond", {}),
                    pooling=header.pooling,
                    grid_size=header.grid_size,
                    images=data["images"] if "images" in data.files else None,
                    x0_images=data["x0_images"] if "x0_images" in data.files else None,
                    meta=header.meta,
                )
            except ValueError as error:  # __post_init__'s shape checks
                raise RecordError(path, str(error)) from None


@dataclass(frozen=True)
class ActivationHeader(Record):
    """The JSON header of an activation record file."""

    prompts: list[str]
    seeds: list[int]
    blocks: dict[str, list[str]]
    pooling: Pooling
    grid_size: int
    meta: dict[str, JsonValue]
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not set(self.blocks) <= set(HALVES):
            raise ValueError(f"blocks are listed per CFG half {HALVES}, got {list(self.blocks)}")
