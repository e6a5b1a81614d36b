"""One base for the explanation methods (captum's ``Attribution``): settings and the shared loop.

A method is a class with a registry ``name``, a typed config (:class:`MethodConfig`) and one
verb, and writes only its algorithm. The base builds and checks the config, checks the step
and builds the stateless replay (:meth:`Method.step_inputs`), runs work items in batches with
a progress bar, the caller's ``progress``, cancel and Ctrl-C (:class:`Loop`, which keeps a
typed :class:`LoopStatus`), and turns a raw map into a
:class:`~diffwidget.explain.results.SaliencyMap` (:class:`SaliencyMethodBase`).

Examples
--------
>>> from diffwidget.explain.rise import DFRise  # doctest: +SKIP
>>> DFRise(n_masks=200).config.to_json()["n_masks"]  # doctest: +SKIP
200
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import numpy as np

from diffwidget.explain._common import check_step
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import (
    Cancelled,
    ProgressCallback,
    describe_saliency,
    method_label,
)
from diffwidget.explain.results import SaliencyMap, minmax

if TYPE_CHECKING:
    from diffwidget.tracing.replay import StepReplay
    from diffwidget.tracing.trace import Trace

C = TypeVar("C", bound=MethodConfig)


@dataclass
class LoopStatus:
    """How far a method's loop got (stored in a result's ``meta`` by :meth:`to_meta`).

    Attributes
    ----------
    total : int
        Work items asked for (masks, orderings, steps).
    done : int
        Items finished.
    cancelled : bool
        The progress callback returned ``False`` before the end.
    interrupted : bool
        Ctrl-C stopped the loop after at least one batch.
    first_batch_seconds : float, optional
        Seconds from the method's start to the end of the first batch (set-up included).
    """

    total: int
    done: int = 0
    cancelled: bool = False
    interrupted: bool = False
    first_batch_seconds: float | None = None

    @property
    def complete(self) -> bool:
        """Every item done, neither cancelled nor interrupted."""
        return self.done == self.total and not self.cancelled and not self.interrupted

    def to_meta(self) -> dict[str, Any]:
        """The ``meta`` entries of a partial-capable result."""
        return {
            "n_used": self.done,
            "complete": self.complete,
            "cancelled": self.cancelled,
            "interrupted": self.interrupted,
            "first_batch_seconds": self.first_batch_seconds,
        }


@dataclass
class Convergence:
    """Split-half reliability of a streamed estimate, after every batch.

    ``history`` holds ``[items done, r]`` with ``r`` the correlation of the estimates from
    the even- and the odd-numbered items; ``reliability`` is Spearman-Brown's ``2r / (1 + r)``.
    """

    history: list[list[float]] = field(default_factory=list)

    def add(self, done: int, r: float) -> None:
        """Record the split-half correlation after ``done`` items."""
        self.history.append([done, r])

    @property
    def split_half_r(self) -> float:
        """The last correlation (0 before the first batch)."""
        return self.history[-1][1] if self.history else 0.0

    @property
    def reliability(self) -> float:
        """Spearman-Brown reliability of the full estimate."""
        r = self.split_half_r
        return 2 * r / (1 + r) if r > -1 else 0.0

    def to_json(self) -> dict[str, Any]:
        """``meta["convergence"]``: the last ``r``, its reliability and the history."""
        return {
            "split_half_r": self.split_half_r,
            "reliability": self.reliability,
            "history": self.history,
        }


class Loop:
    """Work items in batches with progress, cancel and Ctrl-C (use as a context manager).

    Iterating yields ``(begin, end)`` item ranges. After each batch the bar advances and
    ``progress(done, total)`` is called; when it returns ``False`` before the end, the loop
    stops (``partial=True``: the method returns what it has, ``status.cancelled``) or raises
    :class:`~diffwidget.explain.protocol.Cancelled` (``partial=False``: methods without a
    meaningful partial result). Ctrl-C after the first batch ends the ``with`` block quietly
    when ``partial`` (``status.interrupted``); before it, or without ``partial``, it propagates.

    Examples
    --------
    >>> with Loop(5, 2, None, start=time.perf_counter()) as loop:
    ...     ranges = list(loop)
    >>> ranges, loop.status.complete
    ([(0, 2), (2, 4), (4, 5)], True)
    """

    def __init__(
        self,
        total: int,
        batch: int,
        progress: ProgressCallback | None,
        *,
        start: float,
        desc: str = "",
        unit: str = "it",
        bar: bool = False,
        partial: bool = True,
    ) -> None:
        self.status = LoopStatus(total)
        self.batch = max(1, int(batch))
        self.progress = progress
        self.start = start
        self.partial = partial
        self._bar_options = {"desc": desc, "unit": unit, "disable": not bar}
        self._bar: Any = None

    def __enter__(self) -> Loop:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.status.total, **self._bar_options)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> bool:
        self._bar.close()
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        if interrupted and self.partial and self.status.done > 0:
            self.status.interrupted = True
            return True
        return False

    def __iter__(self) -> Iterator[tuple[int, int]]:
        total = self.status.total
        for begin in range(0, total, self.batch):
            end = min(begin + self.batch, total)
            yield begin, end
            if not self._advance(end - begin):
                return

    def _advance(self, n: int) -> bool:
        """Count a finished batch; False when the caller asked to stop."""
        status = self.status
        status.done += n
        if status.first_batch_seconds is None:
            status.first_batch_seconds = time.perf_counter() - self.start
        self._bar.update(n)
        if self.progress is None or self.progress(status.done, status.total) is not False:
            return True
        if status.done < status.total:
            if not self.partial:
                raise Cancelled(f"cancelled after {status.done} of {status.total} items")
            status.cancelled = True
        return False


@dataclass(frozen=True)
class StepInputs:
    """What a per-step method works on: the checked step of a trace and its replay."""

    pipe: Any
    trace: Trace
    step: int
    replay: StepReplay
    start: float

    @property
    def size(self) -> tuple[int, int]:
        """The latent grid ``(h, w)``."""
        return self.trace.latent_shape

    def elapsed(self) -> float:
        """Seconds since the method started."""
        return time.perf_counter() - self.start


class Method(Generic[C]):
    """Base of the explanation methods: a typed config, a progress bar, the shared loop.

    Parameters
    ----------
    config : MethodConfig, optional
        The method's settings record; default built from ``settings``.
    progress_bar : bool, optional
        Show a ``tqdm.auto`` bar while the loop runs (default: the class's
        ``progress_bar_default``).
    **settings
        The config's fields, e.g. ``DFRise(n_masks=200)``; not together with ``config``.

    Raises
    ------
    TypeError
        For an unknown setting (the message lists the config's), a config of another
        method, or both a config and settings.
    """

    #: Registry name (``"df_rise"``); the label comes from the protocol's table.
    name: ClassVar[str]
    #: How people call the method (menus, captions, progress bars).
    label: ClassVar[str]
    #: The settings record of this method.
    config_class: ClassVar[type[MethodConfig]]
    #: What one loop item is, for the progress bar.
    unit: ClassVar[str] = "it"
    #: Whether a bar is shown when ``progress_bar`` is not given.
    progress_bar_default: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and "label" not in cls.__dict__:
            cls.label = method_label(cls.name)

    def __init__(
        self, config: C | None = None, /, *, progress_bar: bool | None = None, **settings: Any
    ) -> None:
        kind = self.config_class
        if config is None:
            unknown = sorted(set(settings) - set(kind.setting_names()))
            if unknown:
                raise TypeError(
                    f"{type(self).__name__} has no setting {', '.join(map(repr, unknown))}; "
                    f"its settings are {list(kind.setting_names())}"
                )
            config = cast(C, kind(**settings))
        elif settings:
            raise TypeError(
                f"pass {type(self).__name__} either a {kind.__name__} or settings, not both; "
                f"use config.replace({', '.join(f'{k}=...' for k in settings)})"
            )
        elif not isinstance(config, kind):
            raise TypeError(
                f"{type(self).__name__} takes a {kind.__name__}, got {type(config).__name__}"
            )
        self.config: C = config
        self.progress_bar = self.progress_bar_default if progress_bar is None else progress_bar

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            # Settings read as attributes (``rise.n_masks``), as before configs existed;
            # typed code reads ``rise.config.n_masks``.
            config = self.__dict__.get("config")
            if config is not None and name in type(config).setting_names():
                return getattr(config, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def step_inputs(self, pipe: Any, trace: Trace, step: int) -> StepInputs:
        """Check ``step``, start the clock and build the stateless replay of that step."""
        from diffwidget.tracing.replay import StepReplay

        step = check_step(trace, step)
        start = time.perf_counter()
        return StepInputs(pipe, trace, step, StepReplay(pipe, trace), start)

    def loop(
        self,
        total: int,
        batch: int,
        progress: ProgressCallback | None,
        *,
        start: float,
        partial: bool = True,
    ) -> Loop:
        """The shared loop over ``total`` items, labelled with this method's name and unit."""
        return Loop(
            total,
            batch,
            progress,
            start=start,
            desc=self.label,
            unit=self.unit,
            bar=self.progress_bar,
            partial=partial,
        )


@dataclass
class SaliencyParts:
    """What a saliency algorithm computes; the base makes the :class:`SaliencyMap` of it."""

    raw: np.ndarray
    meta: dict[str, Any]
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    layers_raw: dict[str, np.ndarray] = field(default_factory=dict)


class SaliencyMethodBase(Method[C]):
    """A per-step saliency method: implement :meth:`_saliency` (and :meth:`describe`)."""

    def attribute(
        self,
        pipe: Any,
        trace: Trace,
        step: int,
        progress: ProgressCallback | None = None,
    ) -> SaliencyMap:
        """The saliency map at loop index ``step``.

        Parameters
        ----------
        pipe : DiffusionPipeline
            The pipeline the trace came from.
        trace : Trace
            The recorded run.
        step : int
            Loop index (not the scheduler timestep).
        progress : callable, optional
            Called as ``progress(done, total)`` after every batch; returning ``False``
            stops early and returns the partial estimate (``meta["complete"] = False``)
            where the method has one. Pressing Ctrl-C does the same.

        Returns
        -------
        SaliencyMap
            ``map`` min-max normalised, ``raw`` the method's estimate, ``meta["seconds"]``.
        """
        inputs = self.step_inputs(pipe, trace, step)
        parts = self._saliency(inputs, progress)
        raw = np.asarray(parts.raw, dtype=np.float32)
        return SaliencyMap(
            method=self.name,
            step=inputs.step,
            timestep=int(trace.timesteps[inputs.step]),
            map=minmax(raw),
            raw=raw,
            layers=parts.layers,
            layers_raw=parts.layers_raw,
            meta={**parts.meta, "seconds": inputs.elapsed()},
        )

    def _saliency(self, inputs: StepInputs, progress: ProgressCallback | None) -> SaliencyParts:
        """The method's algorithm at ``inputs.step``."""
        raise NotImplementedError

    def describe(self, result: SaliencyMap) -> str:
        """The caption of ``result``: the label and the settings found in its ``meta``."""
        return describe_saliency(self.label, result)
