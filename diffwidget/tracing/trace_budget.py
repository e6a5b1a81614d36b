"""What a trace will store and allocate, known before the pipeline runs.

:class:`TraceBudget` is the part of :class:`~diffwidget.tracing.context.TraceContext` that
answers "how much": the bytes each step stores (held to ``memory_budget_mb``) and every
allocation the trace adds to the plain pipeline's, counted against each device's free memory
(:mod:`diffwidget.tracing.budget` has the arithmetic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffwidget.tracing.budget import (
    MemoryPlan,
    StepBytes,
    attention_scratch_bytes,
    check_budget,
    check_free_memory,
    estimate_step_bytes,
    plan_memory,
)
from diffwidget.tracing.decode import (
    LINEAR_DECODER,
    PreviewDecoder,
    check_decoder_channels,
    resolve_preview_decoder,
    vae_decode_bytes,
)
from diffwidget.tracing.joint_attention import CHUNK_BYTES

if TYPE_CHECKING:
    from diffwidget.tracing.attention import AttentionRecorder
    from diffwidget.tracing.families import DenoiserFamily, LatentLayout
    from diffwidget.tracing.recording import StepRecords


class TraceBudget:
    """Stored bytes per step, the memory plan and their checks, for a trace's settings.

    The settings are the :class:`~diffwidget.tracing.context.TraceContext`'s own.
    """

    pipe: Any
    family: DenoiserFamily
    recorder: AttentionRecorder
    records: StepRecords
    token_indices: list[int]
    n_text: int
    decode_previews: bool
    preview_decoder: PreviewDecoder
    memory_budget_mb: float
    _preview_name: str | None = None
    _memory_checked: bool = False
    _planned_steps: int = 0

    def step_bytes(self, height: int, width: int) -> StepBytes:
        """Bytes one step will store for an image of ``height`` x ``width`` pixels."""
        layout = self.family.layout_for(height, width)
        return self._step_bytes(layout, (height, width))

    def _step_bytes(self, layout: LatentLayout, image_hw: tuple[int, int]) -> StepBytes:
        counts = self.family.query_counts(layout)
        cells = sum(counts.values())
        if self.recorder.keep_heads:
            heads = self.family.site_heads()
            cells += sum(n * heads[path] for path, n in counts.items())
        latent = (self.family.latent_channels(), *layout.latent_hw)
        previews = None
        if self.decode_previews:
            # The linear map keeps one pixel per latent cell; a decoder one per image pixel.
            previews = layout.latent_hw if self.preview_name() == LINEAR_DECODER else image_hw
        return estimate_step_bytes(cells, latent, len(self.token_indices), previews)

    def preview_name(self) -> str:
        """What makes this trace's previews: ``"linear"``, ``"vae"`` or a decoder's name."""
        if self._preview_name is None:
            module, name = resolve_preview_decoder(self.pipe, self.preview_decoder)
            vae = getattr(self.pipe, "vae", None)
            channels = getattr(getattr(vae, "config", None), "latent_channels", None)
            if module is not None and channels is not None:
                # Refused before the run: after it, a failed preview decode only warns.
                check_decoder_channels(module, name, int(channels))
            self._preview_name = name
        return self._preview_name

    def check_budget(self, n_steps: int, height: int, width: int) -> StepBytes:
        """Raise ``MemoryBudgetError`` (with the fix) if ``n_steps`` would exceed the budget."""
        step_bytes = self.step_bytes(height, width)
        check_budget(step_bytes, n_steps, self.memory_budget_mb, n_tokens=len(self.token_indices))
        return step_bytes

    def memory_plan(self, n_steps: int, height: int, width: int) -> MemoryPlan:
        """Every allocation ``n_steps`` traced steps of a ``height`` x ``width`` image add.

        Examples
        --------
        >>> from diffwidget.testing.tiny import tiny_sd_pipeline
        >>> from diffwidget.tracing.context import TraceContext
        >>> ctx = TraceContext(tiny_sd_pipeline(), prompt="a red circle")
        >>> sorted(ctx.memory_plan(20, 32, 32).needs())
        ['cpu']
        """
        layout = self.family.layout_for(height, width)
        counts = self.family.query_counts(layout)
        joint = self.family.normalisation == "joint_share"
        # Joint attention scores each image query against the image and text keys.
        keys = self.n_text + (max(counts.values(), default=0) if joint else 0)
        scratch = attention_scratch_bytes(
            counts, self.family.site_heads(), keys, CHUNK_BYTES if joint else None
        )
        vae = getattr(self.pipe, "vae", None)
        decode = vae_decode_bytes(vae, (height, width)) if self.decode_previews and vae else 0
        step = self._step_bytes(layout, (height, width))
        device = str(self.family.denoiser.device)
        return plan_memory(step, n_steps, device, attention_scratch=scratch, decode=decode)

    def check_memory(self, n_steps: int, height: int, width: int) -> MemoryPlan:
        """Raise ``InsufficientMemoryError`` (with the fix) when a device lacks the memory.

        Counts :meth:`memory_plan` against each device's free memory
        (:func:`~diffwidget.tracing.budget.check_free_memory`); :func:`trace` calls it
        before running, a ``with`` block at the first step.
        """
        plan = self.memory_plan(n_steps, height, width)
        check_free_memory(plan, heads=self.recorder.keep_heads)
        self._memory_checked = True
        return plan

    @property
    def loop_done(self) -> bool:
        """Whether every step the scheduler planned was recorded (the loop ran to its end)."""
        return 0 < self._planned_steps <= self.records.n_steps
