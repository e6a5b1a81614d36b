"""What a branch of a recorded trajectory is conditioned on, and the scheduler it steps with.

A branch (:mod:`diffwidget.tracing.branch`) continues a trace from a recorded ``x_k`` with
other conditioning. Two things come from the pipeline, never from a second copy of its logic:

* **the conditioning of another prompt** (:class:`BranchConditioning`): the exact arguments
  the pipeline hands its denoiser for that prompt — text embeddings, pooled projections,
  ``txt_ids``, added conditioning, a text mask — for every family;
* **a scheduler set up as the pipeline sets it up** (timesteps, sigmas, ``mu``, begin index)
  for the trace's settings.

Both come from one pipeline call (:func:`prepare_branches`) that runs the pipeline's own
code up to its first denoiser call and stops there: the text encoders run, the denoiser never
does. During that call the pipeline holds a copy of its scheduler, so the live scheduler is
never touched; the copy, set up but never stepped, is the template of every branch's
scheduler. The call is checked against the trace: the trace's own prompt must give back the
trace's recorded conditioning, and the copy's timesteps the recorded ones, else the error
says which pipeline argument to pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffwidget.tracing.calls import CallTap
from diffwidget.tracing.facts import TEXT_ARGUMENT
from diffwidget.tracing.families import DenoiserCall, DenoiserFamily, denoiser_family
from diffwidget.tracing.taps import LoopState, TapRegistry

if TYPE_CHECKING:
    from diffwidget.tracing.cfg import CfgLayout, Half
    from diffwidget.tracing.facts import ConditioningEntry
    from diffwidget.tracing.trace import Trace

#: Largest difference between the trace's recorded conditioning and the same prompt encoded
#: again (the same computation on the same machine gives 0; float16 encoders round).
CONDITIONING_ATOL = 1e-3


class _Stop(Exception):
    """Raised by the capture tap at the first denoiser call (never leaves this module)."""

    def __init__(self, call: DenoiserCall) -> None:
        super().__init__("first denoiser call reached")
        self.call = call


@dataclass(frozen=True)
class BranchConditioning:
    """One prompt's denoiser-call arguments, one row per CFG half (``cfg.halves`` order).

    Attributes
    ----------
    embeds : Tensor, shape (n_halves, L, D)
        Text embeddings (``encoder_hidden_states``), unconditional half first.
    extra : dict of str to Tensor
        The other call tensors by name: one row per half, or (names in the family's
        ``batch_free``) the tensor as the pipeline passes it.
    key_mask : Tensor, shape (n_halves, L), optional
        1 for text positions the image may attend to, 0 for masked ones (the family's text
        attention mask, :attr:`DenoiserFamily.text_mask_argument`); None: nothing masked.
    """

    embeds: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    key_mask: torch.Tensor | None = None

    @classmethod
    def of_trace(cls, trace: Trace, device: torch.device, dtype: torch.dtype) -> BranchConditioning:
        """The conditioning the trace recorded (both halves)."""

        def load(array: np.ndarray) -> torch.Tensor:
            tensor = torch.as_tensor(array).to(device)
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        extra = {name: load(value) for name, value in trace.extra.items()}
        return cls(load(trace.prompt_embeds), extra)

    def half(self, cfg: CfgLayout, half: Half) -> int:
        """The row of ``half`` in :attr:`embeds` (the prompt's is the last)."""
        return cfg.stored_row(half) % len(self.embeds)

    def with_cond_rows(
        self, positions: Sequence[int], rows: torch.Tensor | None
    ) -> BranchConditioning:
        """A copy whose prompt half has text rows ``positions`` replaced by ``rows``
        (``(len(positions), D)``), or zeroed when ``rows`` is None."""
        embeds = self.embeds.clone()
        index = torch.as_tensor(list(positions), dtype=torch.long)
        embeds[-1, index] = 0.0 if rows is None else rows.to(embeds)
        return BranchConditioning(embeds, self.extra, self.key_mask)

    def with_masked_keys(self, positions: Sequence[int]) -> BranchConditioning:
        """A copy in which the prompt half's text positions ``positions`` cannot be attended to."""
        n_halves, length = self.embeds.shape[:2]
        mask = (
            self.key_mask.clone()
            if self.key_mask is not None
            else torch.ones(n_halves, length, dtype=self.embeds.dtype, device=self.embeds.device)
        )
        mask[-1, torch.as_tensor(list(positions), dtype=torch.long)] = 0.0
        return BranchConditioning(self.embeds, self.extra, mask)


@dataclass
class BranchSetup:
    """The pipeline's scheduler template and the conditioning of each prepared prompt.

    Attributes
    ----------
    scheduler : diffusers scheduler
        A copy of the pipeline's scheduler, set up by the pipeline for the trace's settings
        and never stepped (branches deep-copy it).
    conditionings : dict of str to BranchConditioning
        Prompt -> its conditioning, the unconditional half the trace's own.
    """

    scheduler: Any
    conditionings: dict[str, BranchConditioning]


@contextmanager
def _scheduler_copy(pipe: Any) -> Iterator[Any]:
    """The pipeline runs with a copy of its scheduler inside the block; the live one is
    put back in ``finally`` (and never touched)."""
    live = pipe.scheduler
    clone = copy.deepcopy(live)
    pipe.scheduler = clone
    try:
        yield clone
    finally:
        pipe.scheduler = live


def first_call(
    pipe: Any, family: DenoiserFamily, cfg: CfgLayout, prompt: str, call: dict[str, Any]
) -> tuple[DenoiserCall, Any]:
    """Run ``pipe(prompt, **call)`` up to its first denoiser call; returns that call's
    arguments and the scheduler copy the pipeline set up (the denoiser never runs)."""

    def stop(denoiser_call: DenoiserCall) -> None:
        raise _Stop(denoiser_call)

    tap = CallTap(stop, lambda *_: None)
    with _scheduler_copy(pipe) as scheduler, TapRegistry([tap]).installed(LoopState(family, cfg)):
        try:
            pipe(prompt, **call)
        except _Stop as stopped:
            return stopped.call, scheduler
    raise RuntimeError(
        f"{type(pipe).__name__} returned without calling its denoiser; branches need a "
        "pipeline that runs its own denoising loop"
    )


def inference_steps(scheduler: Any, n_steps: int) -> int:
    """The ``num_inference_steps`` that gives ``n_steps`` loop steps (PLMS repeats a step).

    Examples
    --------
    >>> from diffusers import PNDMScheduler
    >>> inference_steps(PNDMScheduler(skip_prk_steps=True), 6)
    5
    """
    for candidate in range(n_steps, 0, -1):
        probe = copy.deepcopy(scheduler)
        try:
            probe.set_timesteps(candidate)
        except (TypeError, ValueError):  # schedulers that need the pipeline's mu or sigmas
            return n_steps
        if len(probe.timesteps) == n_steps:
            return candidate
    return n_steps


def pipeline_call(
    pipe: Any, trace: Trace, family: DenoiserFamily, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The pipeline arguments that reproduce the trace's settings (``kwargs`` win)."""
    facts = trace.facts
    guidance = kwargs.get(family.guidance_argument())
    if guidance is not None and float(guidance) != float(trace.guidance_scale):
        raise ValueError(
            f"{family.guidance_argument()}={guidance} differs from the trace's guidance scale "
            f"{trace.guidance_scale}: branches continue with the trace's; leave it out"
        )
    steps = inference_steps(pipe.scheduler, trace.n_steps)
    call: dict[str, Any] = {"num_inference_steps": steps, "output_type": "latent"}
    if facts.height and facts.width:
        call.update(height=int(facts.height), width=int(facts.width))
    if family.guidance_argument() == "guidance_scale":
        call["guidance_scale"] = float(trace.guidance_scale)
    if facts.negative_prompt is not None:
        call["negative_prompt"] = facts.negative_prompt
    call.update(kwargs)
    call["generator"] = torch.Generator("cpu").manual_seed(int(facts.seed or 0))
    return call


def _prompt_rows(
    call: DenoiserCall, family: DenoiserFamily, cfg: CfgLayout, entries: list[ConditioningEntry]
) -> dict[str, torch.Tensor]:
    """The prompt half of every ``rows``/``batch_free`` tensor of a captured call, by name."""
    if cfg.kind == "separate" and call.label != "cond":
        raise RuntimeError(
            f"the first denoiser call was labelled {call.label!r}; separate-call guidance "
            "pipelines run the prompt's call first"
        )
    found: dict[str, torch.Tensor] = {}
    for entry in entries:
        if entry.kind not in ("rows", "batch_free"):
            continue
        source = call.conditioning if entry.parent is None else call.conditioning.get(entry.parent)
        value = None if not isinstance(source, dict) else source.get(entry.name)
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(
                f"the pipeline's denoiser call has no tensor {entry.name!r} that the trace "
                "recorded; pass the pipeline arguments the trace was made with"
            )
        if entry.kind == "batch_free" or entry.name in family.batch_free:
            found[entry.name] = value.detach()
        else:
            found[entry.name] = cfg.cond_rows(value.detach(), call.label)[:1]
    return found


def _check_shape(name: str, recorded: torch.Tensor, encoded: torch.Tensor, prompt: str) -> None:
    if recorded.shape != encoded.shape:
        raise ValueError(
            f"{name!r} of {prompt!r} has shape {tuple(encoded.shape)} but the trace recorded "
            f"{tuple(recorded.shape)}: pass the pipeline arguments the trace was made with "
            "(e.g. max_sequence_length, height, width) as keyword arguments"
        )


def _check_same(name: str, recorded: torch.Tensor, encoded: torch.Tensor, prompt: str) -> None:
    _check_shape(name, recorded, encoded, prompt)
    gap = float((recorded.double() - encoded.double()).abs().max()) if recorded.numel() else 0.0
    if gap > CONDITIONING_ATOL:
        raise ValueError(
            f"encoding the trace's own prompt {prompt!r} again gives another {name!r} (largest "
            f"difference {gap:.3g}): the pipeline is not set up as when the trace was made; pass "
            "the arguments it was traced with (guidance, size, max_sequence_length, ...)"
        )


def _check_timesteps(scheduler: Any, trace: Trace) -> None:
    want = np.asarray(trace.facts.timesteps_exact or trace.timesteps, dtype=np.float64)
    got = np.asarray(torch.as_tensor(scheduler.timesteps).double().cpu())
    if got.shape != want.shape or not np.array_equal(got, want):
        raise ValueError(
            f"the pipeline sets up {len(got)} timesteps {got[:3].tolist()}... for these "
            f"arguments, but the trace recorded {len(want)} steps {want[:3].tolist()}...: pass "
            "the arguments it was traced with (num_inference_steps, timesteps, sigmas, size)"
        )


def prepare_branches(
    pipe: Any, trace: Trace, prompts: Sequence[str] = (), **pipeline_kwargs: Any
) -> BranchSetup:
    """The scheduler template and the conditioning of ``prompts`` for branches of ``trace``.

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline the trace came from.
    trace : Trace
        The recorded run; its own prompt is encoded too, to check the call.
    prompts : sequence of str
        Prompts whose conditioning branches will use.
    **pipeline_kwargs
        Pipeline arguments the trace was made with beyond steps, size, guidance, negative
        prompt and seed (which come from the trace), e.g. ``max_sequence_length``.

    Returns
    -------
    BranchSetup

    Raises
    ------
    ValueError
        When the pipeline, called with these arguments, does not reproduce the trace's
        conditioning or timesteps (the message names what to pass).

    Examples
    --------
    >>> setup = prepare_branches(pipe, trace, ["a blue circle on the left"])  # doctest: +SKIP
    >>> list(setup.conditionings)  # doctest: +SKIP
    ['a red circle on the left', 'a blue circle on the left']
    """
    family = denoiser_family(pipe)
    facts = trace.facts
    cfg = facts.cfg(float(trace.guidance_scale), len(trace.prompt_embeds))
    entries = facts.call_layout(list(trace.extra))
    param = next(family.denoiser.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    base = BranchConditioning.of_trace(trace, device, dtype)
    call = pipeline_call(pipe, trace, family, pipeline_kwargs)
    scheduler: Any = None
    conditionings: dict[str, BranchConditioning] = {}
    for prompt in dict.fromkeys([trace.prompt, *prompts]):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        denoiser_call, copied = first_call(pipe, family, cfg, prompt, dict(call))
        scheduler = scheduler if scheduler is not None else copied
        rows = _prompt_rows(denoiser_call, family, cfg, entries)
        embeds = base.embeds.clone()
        text = rows.pop(TEXT_ARGUMENT).to(embeds)
        _check_shape(TEXT_ARGUMENT, embeds[-1:], text, prompt)
        embeds[-1:] = text
        extra = dict(base.extra)
        for name, value in rows.items():
            if name in family.batch_free:
                _check_same(name, extra[name], value.to(extra[name]), prompt)
                continue
            _check_shape(name, extra[name][-1:], value, prompt)
            stored = extra[name].clone()
            stored[-1:] = value.to(stored)
            extra[name] = stored
        conditionings[prompt] = BranchConditioning(embeds, extra)
    own = conditionings[trace.prompt]
    _check_same(TEXT_ARGUMENT, base.embeds, own.embeds, trace.prompt)
    for name, value in base.extra.items():
        _check_same(name, value, own.extra[name], trace.prompt)
    _check_timesteps(scheduler, trace)
    return BranchSetup(scheduler, conditionings)


def retrace(
    pipe: Any, trace: Trace, prompt: str | None = None, *, seed: int | None = None, **kwargs: Any
) -> Trace:
    """Trace ``prompt`` (default the trace's) with the trace's settings and ``seed``.

    Steps, guidance, size, negative prompt and seed (unless given) come from ``trace``;
    ``kwargs`` are passed on to :func:`diffwidget.trace` (e.g. ``max_sequence_length``).

    Examples
    --------
    >>> other = retrace(pipe, trace, "a blue circle on the left")  # doctest: +SKIP
    """
    from diffwidget.tracing.generate import trace as run_trace

    family = denoiser_family(pipe)
    facts = trace.facts
    steps = inference_steps(pipe.scheduler, trace.n_steps)
    settings: dict[str, Any] = {"num_inference_steps": steps, "decode_previews": False}
    if facts.height and facts.width:
        settings.update(height=int(facts.height), width=int(facts.width))
    if family.guidance_argument() == "guidance_scale":
        settings["guidance_scale"] = float(trace.guidance_scale)
    if facts.negative_prompt is not None:
        settings["negative_prompt"] = facts.negative_prompt
    settings.update(kwargs)
    chosen = int(facts.seed or 0) if seed is None else int(seed)
    return run_trace(pipe, trace.prompt if prompt is None else prompt, seed=chosen, **settings)


def word_positions(
    pipe: Any, prompt: str, word: str, *, occurrence: int = 0, **call_kwargs: Any
) -> list[int]:
    """Positions of ``word``'s tokens in the text sequence the denoiser reads for ``prompt``.

    A word is found in every text segment (SD3 reads each word twice: in its CLIP and its T5
    part); a word split into several tokens gives all of them.

    Parameters
    ----------
    pipe : diffusers pipeline
        Its family knows how the pipeline tokenizes.
    prompt, word : str
        The word is matched case-insensitively against the prompt's words.
    occurrence : int
        Which occurrence, when the word appears more than once (0: the first).
    **call_kwargs
        Pipeline arguments that set the text length (``max_sequence_length``).

    Raises
    ------
    ValueError
        When the prompt does not hold the word (the message lists its words).

    Examples
    --------
    >>> import diffwidget
    >>> word_positions(diffwidget.load_demo_pipeline(), "a large red circle on the left", "red")
    [3]
    """
    tokens = denoiser_family(pipe).prompt_tokens(prompt, call_kwargs)
    groups: dict[tuple[str, int], list[int]] = {}
    for position, (kind, segment, index) in enumerate(
        zip(tokens.kinds, tokens.segments, tokens.words, strict=True)
    ):
        if kind == "word" and index >= 0:
            groups.setdefault((segment, index), []).append(position)
    text = {key: "".join(tokens.strings[p] for p in ps).lower() for key, ps in groups.items()}
    target = word.strip().lower()
    found: dict[str, list[list[int]]] = {}
    for key, positions in groups.items():
        if text[key] == target:
            found.setdefault(key[0], []).append(positions)
    if not found:
        words = list(dict.fromkeys(text.values()))
        raise ValueError(f"{prompt!r} has no word {word!r}; its words are {words}")
    positions = []
    for segment, occurrences in found.items():
        if not 0 <= occurrence < len(occurrences):
            raise ValueError(
                f"{word!r} occurs {len(occurrences)} time(s) in the {segment} part of "
                f"{prompt!r}; occurrence must be 0..{len(occurrences) - 1}"
            )
        positions += occurrences[occurrence]
    return sorted(positions)
