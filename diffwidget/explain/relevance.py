"""Token relevance: gradient-weighted attention relevance of each prompt token per step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from diffwidget.explain._common import ProgressCallback, check_int_list, check_step
from diffwidget.explain.base import LoopStatus, Method
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.joint_relevance import is_joint, joint_step
from diffwidget.explain.results import TokenRelevanceResult, minmax
from diffwidget.tracing.replay import StepReplay

if TYPE_CHECKING:
    from diffwidget.tracing.families.base import TextAttention
    from diffwidget.tracing.trace import Trace

#: Guards the row normalisation of relevance matrices against all-zero rows.
_TINY = 1e-12
#: Relative tolerance when checking that the text encoder reproduces the recorded embedding.
_EMBED_RTOL = 1e-3


def _head_mean_relevance(probs: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Chefer's ``A_bar = E_h[(grad * A)^+]`` of one image's ``(heads, n_q, n_k)`` attention."""
    a = probs.float()
    if grad is None:
        return torch.zeros(a.shape[-2:], device=probs.device)
    return (grad.float() * a).clamp_min(0).mean(0)


def _row(t: torch.Tensor | None, row: int) -> torch.Tensor | None:
    return None if t is None else t[row]


def _normalise(r: torch.Tensor) -> torch.Tensor:
    """Chefer's ``R_bar = (R - I) / rowsum(R - I) + I`` for a self-relevance matrix."""
    eye = torch.eye(r.shape[0], device=r.device, dtype=r.dtype)
    hat = r - eye
    return hat / hat.sum(-1, keepdim=True).clamp_min(_TINY) + eye


def _grid_for(n: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The UNet grid with ``n`` positions: the latent grid halved ``k`` times (ceil)."""
    h, w = latent
    for _ in range(16):
        if h * w == n:
            return (h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"an attention layer with {n} positions matches no UNet level of {latent}")


def _resample_rows(r_it: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Carry image-to-text relevance rows to another UNet resolution (area / nearest)."""
    maps = r_it.T.reshape(1, -1, *old)
    mode = "area" if new[0] * new[1] < old[0] * old[1] else "nearest"
    return F.interpolate(maps, size=new, mode=mode)[0].reshape(r_it.shape[1], -1).T


@dataclass(frozen=True)
class TokenRelevanceConfig(MethodConfig):
    """Settings of :class:`TokenRelevance` (each is described there).

    Examples
    --------
    >>> TokenRelevanceConfig(text_encoder=False).to_json()
    {'text_encoder': False, 'self_attention': True}
    """

    text_encoder: bool = True
    self_attention: bool = True


class TokenRelevance(Method[TokenRelevanceConfig]):
    """Relevance of each prompt token at each step (the paper's R2, Chefer et al. 2021 rules).

    At every explained step the UNet is replayed once at the recorded ``x_t`` (one forward,
    one backward; no truncated re-generations), with the *conditional* text embedding
    recomputed by the text encoder so gradients reach its attention. The target is
    ``y = sum`` of the CFG-combined UNet output. For every attention map ``A`` (heads
    ``h``) of the conditional half, ``A_bar = mean_h clamp(dy/dA * A, 0)``, and:

    * text self-attention (causal CLIP layers, in order): ``R_tt <- R_tt + A_bar R_tt``,
      starting from ``R_tt = I``;
    * UNet self-attention (``attn1``): ``R_ii <- R_ii + A_bar R_ii`` and
      ``R_it <- R_it + A_bar R_it``, starting from ``R_ii = I``, ``R_it = 0``;
    * UNet cross-attention (``attn2``): ``R_it <- R_it + R_bar_ii^T A_bar R_bar_tt`` with
      Chefer's normalisation ``R_bar = (R - I) / rowsum(R - I) + I``.

    The relevance of token ``j`` is the mean over image positions of ``R_it[:, j]`` after
    the last attention layer; ``maps`` keeps the columns of ``R_it`` as spatial maps.

    Joint-attention denoisers (SD3, Flux) have no cross-attention: there the self-attention
    rule runs over the whole image-and-text sequence (:mod:`diffwidget.explain.joint_relevance`).

    Parameters
    ----------
    config : TokenRelevanceConfig, optional
        The settings below as one record; or pass them by name.
    text_encoder : bool
        Propagate through the text encoder's self-attention (``R_tt``); with ``False``,
        ``R_tt = I``.
    self_attention : bool
        Use the UNet's self-attention rules; with ``False`` only cross-attention counts.
    progress_bar : bool
        Show a ``tqdm.auto`` progress bar over steps.

    Notes
    -----
    Simplifications (Chefer's rules are for a single-resolution transformer):

    * Attention layers are processed in call order. When the UNet changes resolution,
      ``R_it`` is carried to the new grid by area averaging (down) or nearest repetition
      (up) of its rows, and ``R_ii`` restarts at the identity. Skip connections and
      ResNet/conv paths are not modelled (Chefer's rules cover attention only).
    * When the text encoder does not reproduce the recorded conditional embedding
      (SDXL's two encoders, ``clip_skip``, user-supplied ``prompt_embeds``), the recorded
      embedding is used with ``R_tt = I``; ``meta["text_encoder_used"]`` says which.

    Departures from the paper's public code: it used the *empty* prompt's (unconditional)
    embedding as the relevance source, and it re-ran a truncated generation per step; we
    use the conditional half and replay each recorded step once.

    Examples
    --------
    >>> rel = TokenRelevance().attribute(pipe, trace, steps=[0, 10])  # doctest: +SKIP
    >>> rel.at(10)  # doctest: +SKIP
    {'a': 0.0, 'red': 1.0, 'circle': 0.62, ...}
    """

    name = "token_relevance"
    label = "token relevance"
    config_class = TokenRelevanceConfig
    unit = "step"

    # ------------------------------------------------------------------ text side
    def _token_ids(self, pipe: Any, trace: Trace, length: int) -> torch.Tensor:
        tokens = pipe.tokenizer(
            trace.prompt,
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids

    def _stored_positions(self, trace: Trace, length: int) -> list[int]:
        if trace.facts.token_indices is not None:
            return list(trace.facts.token_indices)
        # Traces built in code may not say: start, words, end and one padding, consecutive.
        return list(range(min(len(trace.tokens), length)))

    def _text_pass(
        self, text: TextAttention | None, ids: torch.Tensor, replay: StepReplay
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Conditional embedding with gradients and the text self-attention probabilities."""
        if not self.config.text_encoder or text is None:
            return None, []
        hidden, text_attn = text.encode(ids)
        hidden = hidden.to(replay.device)
        recorded = replay.cond_embeds.float()
        scale = float(recorded.abs().max()) or 1.0
        if hidden.shape != recorded.shape or not torch.allclose(
            hidden.float(), recorded, atol=_EMBED_RTOL * scale
        ):
            return None, []
        return hidden, text_attn

    # ------------------------------------------------------------------ one step
    def _step(
        self, text: TextAttention | None, replay: StepReplay, step: int, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]:
        length = replay.cond_embeds.shape[1]
        with torch.enable_grad(), replay.family.explicit_attention(length) as records:
            hidden, text_attn = self._text_pass(text, ids, replay)
            if hidden is None:
                hidden = replay.cond_embeds.detach().clone().requires_grad_(True)
            x = replay.latent(step).requires_grad_(True)
            out = replay.model_output(x, step, grad=True, cond_embeds=hidden)
            y = out.sum()
            probs = [r.probs for r in records]
            grads = torch.autograd.grad(y, probs + text_attn, allow_unused=True)
        unet_grads, text_grads = grads[: len(probs)], grads[len(probs) :]
        dev = replay.device
        # The prompt's rows of the replayed call (the text encoder ran on the prompt alone).
        cond = replay.cfg.cond_rows
        with torch.no_grad():
            r_tt = torch.eye(length, device=dev)
            for a, g in zip(text_attn, text_grads, strict=True):
                r_tt = r_tt + _head_mean_relevance(a.detach()[-1], _row(g, -1)).to(dev) @ r_tt
            r_tt_bar = _normalise(r_tt)
            latent = replay.trace.latent_shape
            grid: tuple[int, int] | None = None
            r_ii = r_it = torch.zeros(0, device=dev)
            for record, g in zip(records, unet_grads, strict=True):
                a_bar = _head_mean_relevance(
                    cond(record.probs.detach(), "cond")[-1],
                    None if g is None else cond(g, "cond")[-1],
                )
                n = a_bar.shape[0]
                new_grid = _grid_for(n, latent)
                if grid is None:
                    r_it = torch.zeros(n, length, device=dev)
                elif new_grid != grid:
                    r_it = _resample_rows(r_it, grid, new_grid)
                if new_grid != grid:
                    r_ii = torch.eye(n, device=dev)
                    grid = new_grid
                if record.kind == "cross":
                    if a_bar.shape[1] != length:
                        continue
                    r_it = r_it + _normalise(r_ii).T @ a_bar @ r_tt_bar
                elif self.config.self_attention:
                    r_ii = r_ii + a_bar @ r_ii
                    r_it = r_it + a_bar @ r_it
            if grid is None:
                raise ValueError("the UNet ran no attention layer; nothing to attribute")
            relevance = r_it.mean(0)
            maps = r_it.T.reshape(length, *grid)
            if grid != latent:
                maps = F.interpolate(maps[None], size=latent, mode="bilinear", align_corners=False)[
                    0
                ]
        return relevance.cpu(), maps.cpu(), grid, len(text_attn)

    def attribute(
        self,
        pipe: Any,
        trace: Trace,
        steps: Sequence[int] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TokenRelevanceResult:
        """Compute token relevance at ``steps`` (default: every recorded step).

        Parameters
        ----------
        pipe : DiffusionPipeline
            The pipeline the trace came from (``unet``, ``text_encoder``, ``tokenizer``).
        trace : Trace
            The recorded run.
        steps : sequence of int, optional
            Loop indices to explain.
        progress : callable, optional
            ``progress(done, total)`` after each step; ``False`` or Ctrl-C stops with the
            steps done so far (``meta["complete"] = False``).

        Returns
        -------
        TokenRelevanceResult
        """
        chosen = _chosen_steps(trace, steps)
        start_time = time.perf_counter()
        replay = StepReplay(pipe, trace)
        joint = is_joint(replay.family)
        length = int(trace.prompt_embeds.shape[1])
        # Joint families do not propagate through their text encoders: no ids needed.
        ids = None if joint else self._token_ids(pipe, trace, length)
        keep = self._stored_positions(trace, length)
        rows: list[tuple[np.ndarray, np.ndarray]] = []  # stored tokens' (relevance, maps)
        grids: set[tuple[int, int]] = set()
        text_layers = 0
        with (
            self.loop(len(chosen), 1, progress, start=start_time) as loop,
            replay.family.text_attention() as text,
        ):
            for k, _ in loop:
                if joint:
                    rel, rmap, grid = joint_step(replay, chosen[k])
                else:
                    assert ids is not None
                    rel, rmap, grid, text_layers = self._step(text, replay, chosen[k], ids)
                rows.append((rel.numpy()[keep], rmap.numpy()[keep]))
                grids.add(grid)
        rules = "joint self-attention (Chefer)" if joint else "cross- and self-attention (Chefer)"
        meta = {
            "target": "sum of the CFG-combined model output",
            "rules": rules,
            "text_half": "cond",
            "text_encoder_used": text_layers > 0,
            "text_attention_layers": text_layers,
            "self_attention": self.config.self_attention,
            "token_positions": keep,
            "final_grid": sorted(grids),
        }
        return self._result(trace, chosen[: len(rows)], rows, meta, loop.status, start_time)

    def _result(
        self,
        trace: Trace,
        done_steps: list[int],
        rows: list[tuple[np.ndarray, np.ndarray]],
        meta: dict[str, Any],
        status: LoopStatus,
        start_time: float,
    ) -> TokenRelevanceResult:
        """Stack the steps done; normalise each over the word tokens."""
        relevance = np.stack([row for row, _ in rows]).astype(np.float32)
        words = [i for i, kind in enumerate(trace.token_kinds) if kind == "word"]
        normalized = np.zeros_like(relevance)
        if words:
            for s in range(len(relevance)):
                normalized[s, words] = minmax(relevance[s, words])
        return TokenRelevanceResult(
            tokens=list(trace.tokens),
            token_kinds=list(trace.token_kinds),
            steps=np.asarray(done_steps, dtype=np.int64),
            timesteps=np.asarray([int(trace.timesteps[s]) for s in done_steps], dtype=np.int64),
            relevance=relevance,
            normalized=normalized,
            maps=np.stack([maps for _, maps in rows]).astype(np.float32),
            meta={**meta, **status.to_meta(), "seconds": time.perf_counter() - start_time},
        )


def _chosen_steps(trace: Trace, steps: Sequence[int] | None) -> list[int]:
    """The checked loop indices to explain (every step when ``steps`` is None)."""
    listed = check_int_list("steps", steps)
    chosen = (
        list(range(trace.n_steps)) if listed is None else [check_step(trace, s) for s in listed]
    )
    if not chosen:
        raise ValueError("steps is empty; pass None for every step or a list of loop indices")
    return chosen
