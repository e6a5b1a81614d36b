"""What decides a run's results: the settings record, the model's fingerprint and the digests.

:class:`RunSettings` is stored in the run manifest and compared when a run is resumed. Its
:meth:`~RunSettings.digest` is computed here and nowhere else, over every field that decides
an item's numbers (the model and a fingerprint of its weights, the methods and their typed
configs, the insertion/deletion evaluator's config, the steps, the metrics, the seed rule);
each item record carries the digest of the work that produced it (:func:`work_digest`), so a
record made under other settings, or for another prompt, is never taken for this run's.

The methods' settings are their typed configs (``DFRiseConfig``, ``InsertionDeletionConfig``,
...), kept in the record in the configs' own JSON form (``config.to_json()``): the config
classes live beside their methods and import torch, and a finished run opens without it.
:meth:`RunSettings.config` and :meth:`RunSettings.faithfulness_config` give them back typed
and checked; :meth:`RunSettings.checked` writes every default in (so a changed default changes
the digest too), and :meth:`RunSettings.named` names each setting (``df_rise.n_masks``) for the
summary and for a refused resume.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from diffwidget.explain.attention import AttentionMaps
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import INTERVENTION_NAMES, SALIENCY_METHOD_NAMES
from diffwidget.records import JsonValue, Record
from diffwidget.runs.metric_names import METRIC_METHODS, METRICS, Metric
from diffwidget.runs.metrics import (
    DEFAULT_METHODS,
    DEFAULT_METRICS,
    MAP_METHODS,
    MapMethod,
    default_steps,
)
from diffwidget.runs.prompts import SEED_MODULUS, PromptItem

if TYPE_CHECKING:
    from diffwidget.explain.base import Method
    from diffwidget.explain.faithfulness import InsertionDeletion, InsertionDeletionConfig

#: A map method as a run takes it: a name (default settings), a config, or a method object.
MethodChoice: TypeAlias = "str | MethodConfig | Method[Any]"
#: One config in its JSON form (``config.to_json()``), as the run manifest stores it.
ConfigJson: TypeAlias = dict[str, JsonValue]
#: The insertion/deletion evaluator's name among the methods' settings (``faithfulness.n_random``).
FAITHFULNESS = "faithfulness"
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
    methods : tuple of {"attention", "df_rise", "df_cam", ...}
        Maps computed at every explained step: ``"attention"`` and any registered saliency
        method (default :data:`~diffwidget.runs.metrics.DEFAULT_METHODS`).
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
    configs : dict of str to config JSON
        The typed config of each saliency method in ``methods``, by method name, in the
        config's JSON form (:meth:`config` reads it back); a method without one takes its
        config's defaults, which :meth:`checked` writes in.
    faithfulness : config JSON
        The insertion/deletion evaluator's ``InsertionDeletionConfig`` in its JSON form
        (:meth:`faithfulness_config`); empty: its defaults.
    metrics : tuple of str
        Metrics computed per item (:data:`~diffwidget.runs.metric_names.METRICS`: faithfulness,
        segmentation, roles, probes, commitment, concepts).
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
    >>> rise = RunSettings(methods=("df_rise",), configs={"df_rise": {"n_masks": 8}})
    >>> rise.named()["df_rise.n_masks"]
    8
    """

    methods: tuple[MapMethod, ...] = DEFAULT_METHODS
    steps: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    inference_steps: int = 20
    guidance: float | None = None
    model: str | None = None
    configs: dict[str, ConfigJson] = field(default_factory=dict)
    faithfulness: ConfigJson = field(default_factory=dict)
    metrics: tuple[Metric, ...] = DEFAULT_METRICS
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

    @classmethod
    def of(
        cls,
        methods: Sequence[MethodChoice] = DEFAULT_METHODS,
        faithfulness: InsertionDeletionConfig | InsertionDeletion | None = None,
        **fields: Any,
    ) -> RunSettings:
        """Settings whose methods are given as names, typed configs or configured methods.

        Parameters
        ----------
        methods : sequence of str, method configs or method objects
            See :func:`split_methods`.
        faithfulness : InsertionDeletionConfig or InsertionDeletion, optional
            The evaluator's settings (default: its config's defaults).
        **fields
            The other fields of :class:`RunSettings`.

        Raises
        ------
        TypeError
            For a method that is neither a name, a config nor a method object, or an
            evaluator that is not an ``InsertionDeletionConfig`` or ``InsertionDeletion``.

        Examples
        --------
        >>> from diffwidget.explain.rise import DFRiseConfig
        >>> settings = RunSettings.of(["attention", DFRiseConfig(n_masks=8)])
        >>> settings.methods, settings.config("df_rise").n_masks
        (('attention', 'df_rise'), 8)
        """
        from diffwidget.explain.faithfulness import InsertionDeletionConfig

        names, configs = split_methods(methods)
        # An intervention's or the concept maps' config (PromptSwitchConfig,
        # ConceptMapsConfig) configures a metric, not a map.
        names = [n for n in names if n not in (*INTERVENTION_NAMES, *METRIC_METHODS.values())]
        evaluator = getattr(faithfulness, "config", faithfulness)
        if evaluator is not None and not isinstance(evaluator, InsertionDeletionConfig):
            raise TypeError(
                "faithfulness takes an InsertionDeletionConfig or an InsertionDeletion, got "
                f"{type(faithfulness).__name__}"
            )
        return cls(
            # Unknown names stay until checked() refuses them with the registered ones.
            methods=cast("tuple[MapMethod, ...]", tuple(names)),
            configs={name: config.to_json() for name, config in configs.items()},
            faithfulness=evaluator.to_json() if evaluator is not None else {},
            **fields,
        )

    @property
    def explained_steps(self) -> list[int]:
        """The loop indices explained (``steps`` after defaults)."""
        return list(self.steps or ())

    @property
    def saliency_methods(self) -> list[str]:
        """The registered saliency methods among ``methods`` (those with a config)."""
        return [m for m in self.methods if m in SALIENCY_METHOD_NAMES]

    @property
    def configured(self) -> list[str]:
        """Every method with a config in these settings: the saliency methods, and the
        methods of the metrics computed (:data:`~diffwidget.runs.metric_names.METRIC_METHODS`:
        the prompt switch of ``commitment``, the concept maps of ``concepts``)."""
        extra = [METRIC_METHODS[m] for m in self.metrics if m in METRIC_METHODS]
        return [*self.saliency_methods, *extra]

    def config(self, method: str) -> MethodConfig:
        """The typed config of ``method``, a saliency method or the method of a metric
        (:data:`~diffwidget.runs.metric_names.METRIC_METHODS`; imports it, and torch).

        Raises
        ------
        RecordError
            For stored settings the config refuses, naming the setting.
        """
        from diffwidget.explain.registry import config_class

        return config_class(method).from_json(
            self.configs.get(method, {}), where=f"the run settings of {method}"
        )

    def faithfulness_config(self) -> InsertionDeletionConfig:
        """The insertion/deletion evaluator's typed config (imports it, and torch)."""
        from diffwidget.explain.faithfulness import InsertionDeletionConfig

        return InsertionDeletionConfig.from_json(
            self.faithfulness, where=f"the run settings of {FAITHFULNESS}"
        )

    def checked(self) -> RunSettings:
        """These settings validated for a new run, duplicates dropped, steps sorted and every
        method's config complete (its defaults written in).

        Raises
        ------
        ValueError
            For an unknown method or metric, steps outside the run, bad seeds, a config of a
            method the run does not compute or a setting its config refuses, or a model
            folder that is not a pipeline; the message says how to fix it.
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
        if self.guidance is not None and not self.guidance > 1:
            raise ValueError(
                f"guidance must be above 1 (classifier-free guidance), got {self.guidance}"
            )
        _check_model(self.model)
        methods = self.replace(
            methods=tuple(_choices("method", self.methods, MAP_METHODS)),
            metrics=tuple(_choices("metric", self.metrics, METRICS)) if self.metrics else (),
        )
        extra = sorted(set(self.configs) - set(methods.configured))
        if extra:
            metrics = {method: metric for metric, method in METRIC_METHODS.items()}
            raise ValueError(
                f"settings given for {extra}, which this run does not compute; add them to "
                f"methods ({list(methods.methods)}), or the metric that uses them ("
                + ", ".join(f"{metrics[m]!r} for {m}" for m in metrics)
                + ")"
            )
        return methods.replace(
            # Each config checks its own values; the defaults are the configs' own.
            configs={name: self.config(name).to_json() for name in methods.configured},
            faithfulness=self.faithfulness_config().to_json(),
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

    def named(self) -> dict[str, JsonValue]:
        """Every setting by name, a method's as ``"method.setting"`` (``"df_rise.n_masks"``,
        ``"faithfulness.n_random"``), in field order: how a summary lists them and how a
        refused resume names the one that differs."""
        named: dict[str, JsonValue] = {}
        for name, value in self.to_json().items():
            if name == "configs":
                named.update(_flat(self.configs))
            elif name == FAITHFULNESS:
                named.update(_flat({FAITHFULNESS: self.faithfulness}))
            else:
                named[name] = value
        return named

    def differences(self, other: RunSettings) -> list[str]:
        """``"name: <here> there, <other> now"`` for each setting that differs (a method's
        settings where both compute it; ``methods`` names the others)."""
        mine, theirs = self.named(), other.named()
        only_one = set(self.configs) ^ set(other.configs)
        names = [n for n in dict.fromkeys([*mine, *theirs]) if n.partition(".")[0] not in only_one]
        return [
            f"{name}: {_shown(mine, name)} there, {_shown(theirs, name)} now"
            for name in names
            if (name in mine, mine.get(name)) != (name in theirs, theirs.get(name))
        ]


def split_methods(choices: Sequence[MethodChoice]) -> tuple[list[str], dict[str, MethodConfig]]:
    """The names of a run's maps and the typed configs among them.

    Parameters
    ----------
    choices : sequence of str, MethodConfig or method objects
        ``"attention"``, a registered name (its default settings), a config such as
        ``DFRiseConfig(n_masks=200)``, or a configured method such as ``DFRise(n_masks=200)``.

    Raises
    ------
    TypeError
        For anything else, or a config no registered method takes.

    Examples
    --------
    >>> split_methods(["attention", "df_cam"])
    (['attention', 'df_cam'], {})
    """
    names: list[str] = []
    configs: dict[str, MethodConfig] = {}
    for choice in choices:
        if isinstance(choice, str):
            names.append(choice)
            continue
        config = getattr(choice, "config", choice)
        if not isinstance(config, MethodConfig):
            raise TypeError(
                f"a run's methods are names, configs or method objects; got "
                f"{type(choice).__name__} (e.g. pass DFRiseConfig(n_masks=200) or 'df_rise')"
            )
        from diffwidget.explain.registry import method_name

        names.append(method_name(config))
        configs[names[-1]] = config
    return names, configs


def _flat(configs: dict[str, ConfigJson]) -> dict[str, JsonValue]:
    return {
        f"{method}.{name}": value
        for method, data in configs.items()
        for name, value in data.items()
    }


def _shown(named: dict[str, JsonValue], name: str) -> str:
    return repr(named[name]) if name in named else "unset"


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
