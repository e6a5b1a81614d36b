"""Classifier-free guidance: the one home of the batch layout and the guidance formula.

diffusers runs classifier-free guidance (CFG) in one of three ways, and every part of
diffwidget that splits a denoiser batch, combines two predictions or replays a step asks
this module which one a trace used:

===========  =====================================================  ==========================
layout       how the pipeline calls the denoiser                    pipelines
===========  =====================================================  ==========================
``batched``  one call per step on ``[uncond, cond]`` (negative       SD 1.x/2.x, SDXL, SD3,
             prompt first), guided ``u + w (c - u)``                PixArt
``separate`` two calls per step, labelled by diffusers'             Flux with ``true_cfg_scale``
             ``cache_context("cond")`` then ``("uncond")``
``none``     one call on the prompt alone                           Flux (guidance-distilled),
                                                                    any pipeline at ``w <= 1``
===========  =====================================================  ==========================

One :class:`CfgLayout` object is decided per trace (:meth:`CfgLayout.observe` while
recording, :meth:`CfgLayout.replayed` when a saved trace is replayed; a denoiser family
predicts it from the call arguments) and answers every question about the halves: which
rows of a call are the prompt's (:meth:`~CfgLayout.rows`), which call of a step is
(:meth:`~CfgLayout.split_calls`), how the halves merge with ``w``
(:meth:`~CfgLayout.combine`, and :meth:`~CfgLayout.combine_gradients` for gradients of
the guided output), how a replay calls the denoiser (:meth:`~CfgLayout.run`) and which
stored row holds a half (:meth:`~CfgLayout.stored_row`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

if TYPE_CHECKING:
    import torch

CfgKind = Literal["batched", "separate", "none"]
CFG_KINDS: tuple[str, ...] = get_args(CfgKind)
Half = Literal["uncond", "cond"]
#: Order of the two halves in a batched call and in every stored CFG record (rows of
#: ``Trace.prompt_embeds`` and ``Trace.extra``): diffusers concatenates [negative, positive].
CFG_HALVES: tuple[Half, Half] = ("uncond", "cond")
#: The ``cache_context`` names Flux-style pipelines give their two separate calls.
CACHE_CONTEXT_NAMES: dict[str, Half] = {"cond": "cond", "uncond": "uncond"}
#: Order of the separate calls within a step: the pipelines run the prompt's call first.
SEPARATE_CALL_ORDER: tuple[Half, Half] = ("cond", "uncond")

T = TypeVar("T")


def guide(uncond: T, cond: T, guidance_scale: float) -> T:
    """The guided prediction ``uncond + w (cond - uncond)`` (arrays or tensors).

    Examples
    --------
    >>> guide(1.0, 3.0, 2.0)
    5.0
    """
    return uncond + guidance_scale * (cond - uncond)  # type: ignore[operator]


@dataclass(frozen=True)
class CfgLayout:
    """How one trace's denoiser calls hold the CFG halves.

    Attributes
    ----------
    kind : {"batched", "separate", "none"}
        See the module docstring.
    guidance_scale : float
        ``w`` (``true_cfg_scale`` for Flux's separate calls). Recorded as given, also when
        it is 0 or 1 (then no unconditional half runs).

    Examples
    --------
    >>> import torch
    >>> cfg = CfgLayout("batched", 7.5)
    >>> cfg.rows("cond", torch.tensor([[0.0], [1.0]])).tolist()
    [[1.0]]
    >>> cfg.combine(torch.tensor(1.0), torch.tensor(3.0)).item()
    16.0
    """

    kind: CfgKind
    guidance_scale: float

    def __post_init__(self) -> None:
        if self.kind not in CFG_KINDS:
            raise ValueError(f"unknown CFG layout {self.kind!r}; use one of {CFG_KINDS}")

    # ------------------------------------------------------------------ deciding it
    @classmethod
    def observe(
        cls,
        calls: Sequence[tuple[str | None, int]],
        guidance_scale: float,
        *,
        complete: bool = True,
    ) -> CfgLayout:
        """The layout of one image's step, read off its denoiser calls.

        Parameters
        ----------
        calls : sequence of (label, batch)
            Each call's ``cache_context`` name (or None) and batch size, in call order.
        guidance_scale : float
            ``w``, kept as given.
        complete : bool
            Whether ``calls`` are all of the step's calls. While the first call of a run is
            still running (``False``), a call labelled by diffusers' ``cache_context`` may
            be the first of two separate calls, and its label says which half it is.

        Raises
        ------
        RuntimeError
            When the calls fit no layout (several calls per step, or more than one image).
        """
        labels = {label for label, _ in calls}
        first_label, batch = calls[0] if calls else (None, 0)
        both = len(calls) == 2 and labels == set(CACHE_CONTEXT_NAMES)
        # A labelled first call may be the first of two separate calls; its label says which.
        first_of_two = not complete and len(calls) == 1 and first_label in CACHE_CONTEXT_NAMES
        kind: CfgKind
        if both or first_of_two:
            kind = "separate"
        elif len(calls) == 1 and batch in (1, len(CFG_HALVES)):
            kind = "batched" if batch == len(CFG_HALVES) else "none"
        elif len(calls) == 1:
            raise RuntimeError(
                f"the denoiser ran on a batch of {batch}; trace one prompt and one image at "
                "a time (num_images_per_prompt=1)"
            )
        else:
            raise RuntimeError(
                f"the denoiser ran {len(calls)} times in step 0; diffwidget traces pipelines "
                "that call it once per step (CFG batched) or once per CFG half (Flux's "
                "true_cfg_scale). Use a scheduler that evaluates the model once per step."
            )
        return cls(kind, float(guidance_scale))

    @classmethod
    def replayed(cls, recorded: CfgKind, guidance_scale: float, n_rows: int) -> CfgLayout:
        """The layout a saved trace replays with, from the layout it recorded.

        As in diffusers, a guidance scale ``<= 1`` runs the prompt's half alone, so a trace
        whose ``guidance_scale`` was lowered after recording replays without CFG; so does a
        trace that stored only the prompt's row (``n_rows < 2``).

        Examples
        --------
        >>> CfgLayout.replayed("batched", 1.0, 2).kind
        'none'
        """
        kind = recorded if guidance_scale > 1.0 and n_rows >= len(CFG_HALVES) else "none"
        return cls(kind, guidance_scale)

    # ------------------------------------------------------------------ the halves
    @property
    def halves(self) -> tuple[Half, ...]:
        """The halves stored in the trace, in order: ``("uncond", "cond")`` or ``("cond",)``."""
        return CFG_HALVES if self.kind != "none" else ("cond",)

    @property
    def calls_per_step(self) -> int:
        """Denoiser calls the pipeline makes per step."""
        return 2 if self.kind == "separate" else 1

    @property
    def guided(self) -> bool:
        """Whether an unconditional half exists."""
        return self.kind != "none"

    def halves_in_call(self, label: str | None = None) -> tuple[Half, ...]:
        """The halves one denoiser call holds, in batch order.

        ``label`` is the call's ``cache_context`` name; it decides for separate calls.

        Raises
        ------
        RuntimeError
            For a separate call without a ``"cond"``/``"uncond"`` label.
        """
        if self.kind == "batched":
            return CFG_HALVES
        if self.kind == "none":
            return ("cond",)
        if label not in CACHE_CONTEXT_NAMES:
            raise RuntimeError(
                f"a denoiser call labelled {label!r} under separate-call classifier-free "
                "guidance; the pipeline must name its calls with cache_context('cond') and "
                "cache_context('uncond')"
            )
        return (CACHE_CONTEXT_NAMES[label],)

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(uncond, cond)`` rows of one batched call's tensor (``uncond`` is None without CFG).

        Raises
        ------
        RuntimeError
            When a batched-CFG tensor has an odd batch.
        """
        if self.kind != "batched":
            return None, batch
        if batch.shape[0] % 2:
            raise RuntimeError(
                f"a denoiser tensor has batch {batch.shape[0]} under batched classifier-free "
                "guidance; expected [uncond, cond] halves of equal size"
            )
        uncond, cond = batch.chunk(2)
        return uncond, cond

    def rows(
        self, half: Half, batch: torch.Tensor, label: str | None = None
    ) -> torch.Tensor | None:
        """The rows of ``half`` in one call's tensor; None when that call does not hold it.

        ``label`` is the call's ``cache_context`` name (separate calls hold one half each).
        """
        held = self.halves_in_call(label)
        if half not in held:
            return None
        if len(held) == 1:
            return batch
        uncond, cond = self.split(batch)
        return cond if half == "cond" else uncond

    def cond_rows(self, batch: torch.Tensor, label: str | None = None) -> torch.Tensor:
        """The prompt's rows of one call's tensor (the whole batch without batched CFG).

        Raises
        ------
        RuntimeError
            For a call that holds only the unconditional half.
        """
        rows = self.rows("cond", batch, label)
        if rows is None:
            raise RuntimeError("the unconditional call holds none of the prompt's rows")
        return rows

    def split_calls(
        self, per_call: Sequence[T], labels: Sequence[str | None] | None = None
    ) -> tuple[T | None, T]:
        """``(uncond, cond)`` of one step's per-call values (one value per denoiser call).

        A batched step has one call whose value holds both halves: it is returned as the
        ``cond`` entry with ``uncond`` None, to be split by :meth:`split`; separate calls are
        told apart by their ``labels`` or, without labels, by the pipelines' order (the
        prompt's call first, :data:`SEPARATE_CALL_ORDER`).

        Raises
        ------
        RuntimeError
            When the number of calls does not match the layout.
        """
        if len(per_call) != self.calls_per_step:
            raise RuntimeError(
                f"expected {self.calls_per_step} denoiser call(s) per step under "
                f"{self.kind!r} classifier-free guidance, recorded {len(per_call)}"
            )
        if self.kind != "separate":
            return None, per_call[0]
        names = labels if labels is not None else SEPARATE_CALL_ORDER
        by_half = {
            self.halves_in_call(label)[0]: value
            for label, value in zip(names, per_call, strict=True)
        }
        if set(by_half) != set(CFG_HALVES):
            raise RuntimeError(f"the two separate CFG calls are labelled {list(names)}")
        return by_half["uncond"], by_half["cond"]

    def step_halves(
        self, per_call: Sequence[torch.Tensor], labels: Sequence[str | None] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(uncond, cond)`` tensors of one step, whatever the layout: :meth:`split_calls`,
        then :meth:`split` of a batched call."""
        uncond, cond = self.split_calls(per_call, labels)
        return (uncond, cond) if uncond is not None else self.split(cond)

    # ------------------------------------------------------------------ merging
    def combine(self, uncond: T | None, cond: T) -> T:
        """The guided prediction from the two halves (``cond`` alone without CFG)."""
        if uncond is None or not self.guided:
            return cond
        return guide(uncond, cond, self.guidance_scale)

    def combine_gradients(self, uncond: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        """The gradient of the guided output with respect to a CFG-combined activation.

        The gradient of ``y(u + w (c - u))`` already carries the factors ``(1 - w)`` and
        ``w`` in its two halves ``dy/dA_u`` and ``dy/dA_c``; the combined gradient is their
        sum (combining them again with ``w`` would apply the guidance twice).
        """
        if uncond is None or not self.guided:
            return cond
        return uncond + cond

    # ------------------------------------------------------------------ replay
    def run(self, call: Callable[[tuple[Half, ...]], torch.Tensor]) -> torch.Tensor:
        """The guided output as the pipeline makes it: ``call(halves)`` runs the denoiser
        once on the listed halves (batched in that order) and returns its output."""
        if self.kind == "none":
            return call(("cond",))
        if self.kind == "batched":
            uncond, cond = self.split(call(CFG_HALVES))
            return self.combine(uncond, cond)
        outputs = {half: call((half,)) for half in SEPARATE_CALL_ORDER}
        return self.combine(outputs["uncond"], outputs["cond"])

    @staticmethod
    def stored_row(half: Half) -> int:
        """The row of ``half`` in a stored CFG record (``Trace.prompt_embeds``, ``extra``).

        The prompt's row is the last one whether one or two halves are stored.
        """
        return -1 if half == "cond" else CFG_HALVES.index(half)

    def stored(self, per_call: Sequence[T], labels: Sequence[str | None]) -> list[T]:
        """One step's per-call values in stored order: one entry per call, in
        :data:`CFG_HALVES` order for separate calls (a batched call already holds both)."""
        uncond, cond = self.split_calls(per_call, labels)
        return [cond] if uncond is None else [uncond, cond]
