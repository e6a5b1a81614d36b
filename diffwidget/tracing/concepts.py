"""Concept maps for any words, recorded during a denoiser run (ConceptAttention).

:class:`ConceptTap` is a tap (:mod:`diffwidget.tracing.taps`) that adds concept tokens to
every text→image attention layer of the denoiser and records, per layer and step, the image
tokens' attention outputs projected onto the concepts' outputs
(:mod:`diffwidget.tracing.concept_attention` has the definition). It runs beside a trace::

    tap = ConceptTap(pipe, ["circle", "dog"])
    trace = diffwidget.trace(pipe, "a red shape on the left", taps=[tap])
    scores = tap.result()            # a ConceptScores record

or on the recorded steps of a saved trace (:func:`replay_concepts`, one denoiser call on the
prompt's half per step). The words are embedded by the pipeline's own text encoders, one
word at a time: a concept token is the last piece of its word in the first text segment
(CLIP's for SD3, T5's for Flux; CLIP reads left to right, so the last piece has read the
whole word). The image is never changed: the tap only reads what the model computes.

The words are checked and embedded in :mod:`diffwidget.tracing.concept_words`, which also holds
the record (:class:`~diffwidget.tracing.concept_words.ConceptScores`). The softmax over
concepts is taken when a result is built
(:class:`~diffwidget.explain.concept_maps.ConceptMaps`); the record keeps the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import numpy as np
import torch

from diffwidget.tracing.concept_attention import (
    SPACES,
    ConceptLayer,
    ConceptTokens,
    Space,
    argument,
    attend,
    image_scores,
    projections,
)
from diffwidget.tracing.concept_words import (
    KEY_SEPARATOR,
    ConceptScores,
    check_words,
    encode_concepts,
)
from diffwidget.tracing.model_hooks import HOOK_PREFIX
from diffwidget.tracing.taps import Tap, TapKind

if TYPE_CHECKING:
    from diffwidget.tracing.families.base import DenoiserCall, DenoiserFamily, LatentLayout
    from diffwidget.tracing.taps import LoopState
    from diffwidget.tracing.trace import Trace

#: Bytes of image keys, values and outputs a buffered tap keeps before it computes.
BUFFER_BYTES = 256 * 2**20
#: How the concept side is computed (:class:`ConceptTap`).
Mode = Literal["auto", "buffered", "inline"]
MODES: tuple[str, ...] = get_args(Mode)


# ---------------------------------------------------------------------------- the tap
class _Call:
    """What one layer saw in one recorded call: the prompt's rows, image tokens only."""

    __slots__ = ("keys", "n_text", "outputs", "raw", "rotary", "scores", "temb", "tokens", "values")

    def __init__(self) -> None:
        self.temb: torch.Tensor | None = None
        self.rotary: Any = None
        self.n_text = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.outputs: dict[str, torch.Tensor] = {}
        # Inline only: the layer's concept tokens, scores and attention output so far.
        self.tokens: ConceptTokens | None = None
        self.scores: torch.Tensor | None = None
        self.raw: torch.Tensor | None = None


class ConceptTap(Tap):
    """Concept maps for ``words`` at every text→image attention layer, during a run.

    The concept side is computed in one of two ways, with the same numbers: *buffered*, the
    prompt's image keys, values and outputs of several steps are kept (within
    :data:`BUFFER_BYTES`) and the concept tokens go through all layers for those steps at
    once — a small model's per-step cost is then mostly Python, so this is what keeps it
    cheap; *inline*, each layer's concept tokens are computed while the layer runs, from
    chunks of its image keys and values (bounded like the joint capture), and nothing
    image-sized is kept — how large models run. ``mode="auto"`` buffers when one step's
    inputs take at most half of :data:`BUFFER_BYTES`.

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline that will run (its text encoders embed the words now).
    words : sequence of str
        Concept words or short phrases, in the prompt or not (at most
        :data:`~diffwidget.tracing.concept_words.MAX_CONCEPT_WORDS`).
    layers : sequence of str, optional
        Attention layers to record (module paths, as in ``Trace.attention``); default every
        layer. Joint layers before the last chosen one still carry the concept stream.
    steps : sequence of int, optional
        Loop indices to record; default every step. Other steps cost nothing.
    spaces : sequence of {"output", "attention"}
        Where the maps are read (:mod:`~diffwidget.tracing.concept_attention`).
    call_kwargs : dict, optional
        The pipeline call's text arguments (``max_sequence_length``).
    mode : {"auto", "buffered", "inline"}
        How the concept side is computed (see above).
    name : str
        The tap's name.

    Raises
    ------
    TypeError, ValueError
        For words that are not a list of distinct non-empty strings, too many words, an
        unknown layer or space.

    Warns
    -----
    UserWarning
        For words the pipeline's tokenizer cannot read.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> from diffwidget.tracing.generate import trace
    >>> pipe = tiny_sd_pipeline()
    >>> tap = ConceptTap(pipe, ["circle", "square"])
    >>> _ = trace(pipe, "a red circle", num_inference_steps=2, taps=[tap])
    >>> scores = tap.result()
    >>> scores.words, scores.steps
    (['circle', 'square'], [0, 1])
    """

    kind: ClassVar[TapKind] = "attention"

    def __init__(
        self,
        pipe: Any,
        words: Sequence[str],
        *,
        layers: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        spaces: Sequence[Space] = ("output",),
        call_kwargs: dict[str, Any] | None = None,
        mode: Mode = "auto",
        name: str = "concepts",
    ) -> None:
        from diffwidget.tracing.families import denoiser_family

        super().__init__(name)
        family = denoiser_family(pipe)
        checked, embeds = encode_concepts(pipe, family, words, call_kwargs)
        self._setup(family, checked, embeds, layers, steps, spaces, mode)

    @classmethod
    def from_embeddings(
        cls,
        family: DenoiserFamily,
        words: Sequence[str],
        embeds: torch.Tensor,
        *,
        layers: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        spaces: Sequence[Space] = ("output",),
        mode: Mode = "auto",
        name: str = "concepts",
    ) -> ConceptTap:
        """A tap for concept embeddings ``[1, n, text_dim]`` made elsewhere (one per word)."""
        tap = cls.__new__(cls)
        Tap.__init__(tap, name)
        checked = check_words(words)
        if embeds.ndim != 3 or embeds.shape[:2] != (1, len(checked)):
            raise ValueError(
                f"embeddings of shape {tuple(embeds.shape)} for {len(checked)} words; pass "
                "[1, n_words, text_dim]"
            )
        tap._setup(family, checked, embeds, layers, steps, spaces, mode)
        return tap

    def _setup(
        self,
        family: DenoiserFamily,
        words: list[str],
        embeds: torch.Tensor,
        layers: Sequence[str] | None,
        steps: Sequence[int] | None,
        spaces: Sequence[Space],
        mode: Mode,
    ) -> None:
        bad = [s for s in spaces if s not in SPACES]
        if bad or not spaces:
            raise ValueError(f"spaces must be some of {SPACES}, got {list(spaces)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        self.family, self.words, self.embeds = family, words, embeds
        available = [layer.path for layer in family.concept_layers()]
        self.chosen = list(available) if layers is None else list(dict.fromkeys(layers))
        unknown = [p for p in self.chosen if p not in available]
        if unknown or not self.chosen:
            raise ValueError(
                f"no attention layer {unknown or self.chosen}; this denoiser's layers: {available}"
            )
        if steps is not None and any(isinstance(s, bool) or int(s) < 0 for s in steps):
            raise ValueError(f"steps are loop indices (integers from 0), got {list(steps)}")
        self.steps = None if steps is None else sorted({int(s) for s in steps})
        self.spaces: tuple[Space, ...] = tuple(dict.fromkeys(spaces))
        self.mode: Mode = mode
        self.layout: LatentLayout | None = None
        self._layers: list[ConceptLayer] = []
        self._calls: dict[str, _Call] = {}
        self._buffer: list[dict[str, _Call]] = []
        self._capacity = 0
        self._stream: torch.Tensor | None = None
        self._first: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._live = False
        self._row = 0
        self._recorded_steps: list[int] = []
        self._scores: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------ install/remove
    def paths(self) -> tuple[str, ...]:
        """The attention layers the tap reads."""
        return tuple(self.chosen)

    def install(self, loop: LoopState) -> None:
        """Hook the chosen layers (and the joint layers before them)."""
        super().install(loop)
        layers = loop.family.concept_layers()
        last = max(i for i, layer in enumerate(layers) if layer.path in self.chosen)
        kept = [
            layer
            for i, layer in enumerate(layers)
            if layer.path in self.chosen or (layer.kind != "cross" and i < last)
        ]
        self._buffer, self._layers = [], []
        try:
            for layer in kept:
                self._layers.append(layer)
                self._attach(layer)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook (each removal is tried); buffered calls are computed by
        :meth:`result`."""
        error: BaseException | None = None
        for layer in reversed(self._layers):
            try:
                layer.detach()
            except BaseException as exc:
                error = error or exc
        self._calls, self._stream = {}, None
        super().remove()
        if error is not None:
            raise error

    def _attach(self, layer: ConceptLayer) -> None:
        reads = layer.reads(self.spaces)
        prefix = f"{HOOK_PREFIX}{self.name}:"
        if "block" in reads:
            layer.attach(
                reads["block"][0],
                prefix + "block",
                lambda args, kwargs: self._block_in(layer, args, kwargs),
                lambda output: self._block_out(layer),
            )
        for role in ("key", "value", "qkv"):
            if role in reads:
                layer.attach(reads[role][0], prefix + role, None, self._projection(layer, role))
        for space in self.spaces:
            module, when = reads[space]
            if when == "pre":
                layer.attach(module, prefix + space, self._input(layer, space), None)
            else:
                layer.attach(module, prefix + space, None, self._output(layer, space))

    def _output(self, layer: ConceptLayer, space: Space) -> Callable[[Any], None]:
        def read(output: Any) -> None:
            self._image(layer, space, output)

        return read

    def _input(
        self, layer: ConceptLayer, space: Space
    ) -> Callable[[tuple[Any, ...], dict[str, Any]], None]:
        def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._image(layer, space, args[0] if args else next(iter(kwargs.values())))

        return read

    # ------------------------------------------------------------ loop events
    def on_call(self, call: DenoiserCall) -> None:
        """Start a call: decide whether it is recorded and how, and reset the stream."""
        loop = self.loop
        assert loop is not None
        step = loop.step
        wanted = self.steps is None or step in self.steps
        self._live = wanted and "cond" in loop.cfg.halves_in_call(loop.label)
        self._calls = {}
        if not self._live:
            return
        # The prompt's row of this call's batch (the CFG layout's, asked once per call).
        held = loop.cfg.halves_in_call(loop.label)
        if int(call.sample.shape[0]) != len(held):
            raise RuntimeError(
                f"concept maps saw a batch of {int(call.sample.shape[0])} for {len(held)} "
                "CFG halves; map one image at a time (num_images_per_prompt=1)"
            )
        self._row = held.index("cond")
        if self._capacity == 0:
            if self.layout is None:
                self.layout = loop.family.layout(call)
            self._plan(self.layout)
        if self._buffer and len(self._buffer) >= self._capacity:
            self._flush()
        if not self._recorded_steps or self._recorded_steps[-1] != step:
            self._recorded_steps.append(step)
        self._stream = self._first_stream()
        if self.mode == "buffered":
            self._buffer.append(self._calls)

    def _plan(self, layout: LatentLayout) -> None:
        """Buffered or inline, and how many steps a buffer holds (``mode="auto"``)."""
        counts = self.family.query_counts(layout)
        per_step = sum(
            counts[layer.path] * layer.stored_width(self.spaces) for layer in self._layers
        )
        weight = next(iter(self.family.denoiser.parameters()))
        per_step *= weight.element_size()
        capacity = BUFFER_BYTES // max(1, per_step)
        if self.mode == "auto":
            self.mode = "buffered" if capacity >= 2 else "inline"
        self._capacity = max(1, capacity)

    def _first_stream(self) -> torch.Tensor:
        """The concept tokens as the first layer receives them (after the denoiser's text
        embedder, where it has one), ``[1, n, D]``."""
        embed = self.family.concept_embedder()
        params = list(embed.parameters()) if embed is not None else []
        weight = params[0] if params else next(iter(self.family.denoiser.parameters()))
        key = (weight.device, weight.dtype)
        if key not in self._first:
            with torch.no_grad():
                text = self.embeds.to(*key)
                self._first[key] = embed(text) if embed is not None else text
        return self._first[key]

    def _cond(self, tensor: torch.Tensor) -> torch.Tensor:
        """The prompt's row of one call's tensor, with a batch axis of one."""
        return tensor[self._row : self._row + 1]

    def _kept(self, tensor: torch.Tensor) -> torch.Tensor:
        """A buffered copy (a view would keep the whole batch's tensor alive)."""
        return tensor.clone() if self.mode == "buffered" else tensor

    # ------------------------------------------------------------ layer events
    def _block_in(self, layer: ConceptLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._live:
            return
        seen = self._calls.setdefault(layer.path, _Call())
        seen.temb = self._cond(argument(args, kwargs, "temb", 2))
        text = argument(args, kwargs, "encoder_hidden_states", 1)
        seen.n_text = 0 if text is None else int(text.shape[1])
        seen.rotary = argument(args, kwargs, "image_rotary_emb", 3)
        if self.mode == "inline" and self._stream is not None:
            with torch.no_grad():
                seen.tokens = layer.begin(self._stream, seen.temb, seen.rotary)

    def _projection(self, layer: ConceptLayer, role: str) -> Callable[[torch.Tensor], None]:
        def seen(output: torch.Tensor) -> None:
            call = self._calls.get(layer.path)
            if not self._live or call is None:
                return
            rows = layer.image_rows(self._cond(output), call.n_text)
            if role == "qkv":
                _, key, value = rows.chunk(3, dim=-1)
                self._keys(layer, call, key)
                self._values(layer, call, value)
            elif role == "key":
                self._keys(layer, call, rows)
            else:
                self._values(layer, call, rows)

        return seen

    def _keys(self, layer: ConceptLayer, call: _Call, keys: torch.Tensor) -> None:
        if self.mode == "buffered":
            call.keys = keys.clone()
            return
        if call.tokens is None or call.tokens.query is None:
            return
        call.scores = image_scores(
            call.tokens.query,
            keys,
            layer.head_dim,
            lambda k, tokens: layer.prepare_keys(k, tokens, call.rotary, call.n_text),
            layer.scale,
        )

    def _values(self, layer: ConceptLayer, call: _Call, values: torch.Tensor) -> None:
        if self.mode == "buffered":
            call.values = values.clone()
            return
        if call.tokens is None:
            return
        if call.scores is None:
            raise RuntimeError(
                f"{layer.path}: the value projection ran before the key projection; concept "
                "maps need a processor that projects keys first (diffusers' own do)"
            )
        call.raw = attend(call.scores, values, call.tokens, layer.scale)
        call.scores = None

    def _image(self, layer: ConceptLayer, space: Space, output: Any) -> None:
        if not self._live or layer.path not in self.chosen:
            return
        call = self._calls.setdefault(layer.path, _Call())
        tensor = output[0] if isinstance(output, tuple) else output
        image = layer.image_rows(self._cond(tensor), call.n_text)
        if self.mode == "buffered":
            call.outputs[space] = image.clone()
            return
        raw = self._raw(layer, call)
        with torch.no_grad():
            self._store(layer.path, space, projections(image, layer.concept_output(raw, space)))

    def _raw(self, layer: ConceptLayer, call: _Call) -> torch.Tensor:
        """The concepts' attention output at ``layer`` in this call (inline)."""
        if layer.kind == "cross":
            assert self._stream is not None
            return layer.cross_output(self._stream)
        if call.raw is None:
            raise RuntimeError(
                f"{layer.path}: the layer's output ran before its concept attention; its "
                "attention processor does not project keys and values with to_k/to_v"
            )
        return call.raw

    def _block_out(self, layer: ConceptLayer) -> None:
        if not self._live or self.mode == "buffered":
            return
        call = self._calls.get(layer.path)
        if call is None or call.raw is None or self._stream is None:
            return
        with torch.no_grad():
            # Past the last block with a text stream (SD3's context-pre-only) there is none.
            self._stream = layer.advance(self._stream, call.raw)

    def _store(self, layer: str, space: Space, scores: torch.Tensor) -> None:
        """Keep one call's scores ``[1, n_image, n_words]`` of one layer."""
        stored = self._scores.setdefault(f"{space}{KEY_SEPARATOR}{layer}", [])
        stored.extend(scores.unbind(0))
        if len(stored) > len(self._recorded_steps):
            raise RuntimeError(
                f"concept layer {layer} ran twice in step {self._recorded_steps[-1]}; concept "
                "maps need a scheduler that calls the denoiser once per step"
            )

    # ------------------------------------------------------------ buffered steps
    @torch.no_grad()
    def _flush(self) -> None:
        """The concept side of every buffered call, all calls batched, layer by layer."""
        calls, self._buffer = self._buffer, []
        if not calls:
            return
        stream: torch.Tensor | None = self._first_stream().expand(len(calls), -1, -1)
        for layer in self._layers:
            seen = [call.get(layer.path) for call in calls]
            if any(s is None for s in seen):
                raise RuntimeError(f"{layer.path} did not run in every recorded call")
            if layer.kind == "cross":
                raw = layer.cross_output(self._first_stream())
            else:
                raw = self._joint(layer, seen, stream)  # type: ignore[arg-type]
            if layer.path in self.chosen:
                for space in self.spaces:
                    image = torch.cat([s.outputs[space] for s in seen])  # type: ignore[union-attr]
                    self._store(
                        layer.path, space, projections(image, layer.concept_output(raw, space))
                    )
            if layer.kind != "cross" and stream is not None:
                stream = layer.advance(stream, raw)

    def _joint(
        self, layer: ConceptLayer, seen: list[_Call], stream: torch.Tensor | None
    ) -> torch.Tensor:
        """One joint layer's concept attention output for several buffered calls."""
        first = seen[0]
        if stream is None or any(s.keys is None or s.values is None for s in seen):
            raise RuntimeError(
                f"{layer.path}: its key and value projections were not seen; its attention "
                "processor does not project with to_k/to_v"
            )
        temb = torch.cat([s.temb for s in seen])  # type: ignore[misc]
        tokens = layer.begin(stream, temb, first.rotary)
        assert tokens.query is not None
        scores = image_scores(
            tokens.query,
            torch.cat([s.keys for s in seen]),  # type: ignore[misc]
            layer.head_dim,
            lambda k, part: layer.prepare_keys(k, part, first.rotary, first.n_text),
            layer.scale,
        )
        values = torch.cat([s.values for s in seen])  # type: ignore[misc]
        return attend(scores, values, tokens, layer.scale)

    # ------------------------------------------------------------ result
    def result(self) -> ConceptScores:
        """The recorded scores (after the run).

        Raises
        ------
        RuntimeError
            When nothing was recorded (the tap was not installed, or no chosen step ran).
        """
        self._flush()
        if not self._recorded_steps or self.layout is None:
            raise RuntimeError(
                f"the concept tap {self.name!r} recorded nothing: pass it to a trace "
                "(trace(pipe, prompt, taps=[tap])) or use replay_concepts"
            )
        n = len(self._recorded_steps)
        arrays: dict[str, np.ndarray] = {}
        grids: dict[str, list[int]] = {}
        for key, per_step in self._scores.items():
            if len(per_step) != n:
                raise RuntimeError(f"concept layer {key} has {len(per_step)} of {n} steps")
            layer = key.partition(KEY_SEPARATOR)[2]
            stacked = torch.stack(per_step).cpu().numpy().astype(np.float32)
            grid = self.family.site_grid(layer, stacked.shape[1], self.layout)
            grids[layer] = [int(grid[0]), int(grid[1])]
            arrays[key] = stacked.reshape(n, grid[0], grid[1], len(self.words))
        every = self.family.concept_layers()
        return ConceptScores(
            words=list(self.words),
            family=self.family.name,
            layers=[layer.path for layer in every if layer.path in grids],
            steps=list(self._recorded_steps),
            spaces=list(self.spaces),
            projected=[
                layer.path
                for layer in every
                if layer.path in grids and layer.has_output_projection()
            ],
            grids=grids,
            latent_hw=[int(v) for v in self.layout.latent_hw],
            scores=arrays,
        )


@contextmanager
def concept_replay(pipe: Any, trace: Trace, tap: ConceptTap) -> Iterator[Callable[[int], None]]:
    """``tap`` installed on ``pipe``'s denoiser for replaying recorded steps of ``trace``:
    yields ``run(step)``, which makes one denoiser call on the prompt's half at that step
    (the pipeline's scheduler is never touched). Read ``tap.result()`` afterwards.

    Raises
    ------
    IndexError
        From ``run`` for a step outside the trace.
    ValueError
        From ``run`` for a step the tap does not record.
    """
    from diffwidget.tracing.cfg import CfgLayout
    from diffwidget.tracing.replay import StepReplay
    from diffwidget.tracing.taps import LoopState, TapRegistry

    replay = StepReplay(pipe, trace)
    loop = LoopState(replay.family, CfgLayout("none", 1.0))
    tap.layout = replay.layout

    def run(step: int) -> None:
        if not 0 <= step < trace.n_steps:
            raise IndexError(f"step {step} is outside 0..{trace.n_steps - 1} (loop indices)")
        if tap.steps is not None and step not in tap.steps:
            raise ValueError(f"the tap records steps {tap.steps}, not step {step}")
        loop.step = step
        replay.run_half(replay.latent(step), step, "cond", on_call=tap.on_call)

    with TapRegistry([tap]).installed(loop):
        yield run


def replay_concepts(
    pipe: Any, trace: Trace, tap: ConceptTap, steps: Sequence[int] | None = None
) -> ConceptScores:
    """Concept scores at recorded steps of ``trace`` (:func:`concept_replay` for each).

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline the trace came from.
    trace : Trace
        The recorded run.
    tap : ConceptTap
        A tap made for ``pipe`` (not installed elsewhere).
    steps : sequence of int, optional
        Loop indices; default the tap's steps, else every step.
    """
    chosen = list(steps) if steps is not None else tap.steps or list(range(trace.n_steps))
    with concept_replay(pipe, trace, tap) as run:
        for step in chosen:
            run(step)
    return tap.result()


__all__ = [
    "ConceptTap",
    "concept_replay",
    "replay_concepts",
]
