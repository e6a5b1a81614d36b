"""Run the exported live graphs with onnxruntime in Python, the way the browser runs them.

The check of an export (and the Python baseline of ``bench/bench_live.py``): the same
tokenizer, starting noise and scheduler as :func:`diffwidget.trace` (the pipeline's own),
but every network evaluated by onnxruntime from the shipped ``.onnx`` files. Its results
are compared with a trace of the same caption and seed in ``tests/models/test_live_export.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget.models.live_manifest import LiveManifest, live_folder, load_live_manifest
from diffwidget.tracing.noise import (
    predict_x0,
    prediction_type,
    scheduler_family,
    step_coefficients,
)


@dataclass
class LiveRun:
    """What one generation through the exported graphs produced (arrays per step)."""

    ids: list[int]
    latents: np.ndarray
    noise_pred: np.ndarray
    pred_x0: np.ndarray
    previews: np.ndarray
    image: np.ndarray
    timesteps: np.ndarray
    #: Layer path -> float32 ``[n_steps, h, w, n_text]`` (every text position).
    attention: dict[str, np.ndarray] = field(default_factory=dict)


class LiveGraphs:
    """onnxruntime sessions for the four exported graphs of one model (one thread).

    Parameters
    ----------
    model : str
        The exported model (``"unet"`` or ``"dit"``).
    folder : Path, optional
        Where the graphs are; the package's folder by default.
    threads : int
        onnxruntime intra-op threads.
    """

    def __init__(self, model: str = "unet", folder: Path | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        self.folder = Path(folder) if folder is not None else live_folder(model)
        self.manifest: LiveManifest = (
            load_live_manifest(model)
            if folder is None
            else LiveManifest.load(self.folder / "manifest.json")
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions: dict[str, Any] = {
            graph.name: ort.InferenceSession(
                str(self.folder / graph.file), options, providers=["CPUExecutionProvider"]
            )
            for graph in self.manifest.graphs
        }

    def run(self, name: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run graph ``name``; returns its outputs by name."""
        graph = self.manifest.graph(name)
        outputs = self.sessions[name].run(list(graph.outputs), inputs)
        return dict(zip(graph.outputs, outputs, strict=True))


def generate(
    graphs: LiveGraphs,
    pipe: Any,
    prompt: str,
    *,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 3.0,
) -> LiveRun:
    """One generation through the exported graphs (tokenizer and scheduler from ``pipe``).

    Examples
    --------
    >>> run = generate(LiveGraphs(), load_demo_pipeline(), "a red circle")  # doctest: +SKIP
    >>> run.image.shape  # doctest: +SKIP
    (64, 64, 3)
    """
    import torch

    manifest = graphs.manifest
    length = manifest.tokenizer.max_length
    ids = [
        pipe.tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids
        for text in ("", prompt)
    ]
    # Every output of the text graph is an input of the denoiser's (text, and pooled for the DiT).
    text = graphs.run("text_encoder", input_ids=np.asarray(ids, dtype=np.int64))
    denoiser = manifest.denoiser.name
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    family, kind = scheduler_family(scheduler), prediction_type(scheduler)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, manifest.latent_channels, *manifest.latent_hw)
    latent = torch.randn(shape, generator=generator, dtype=torch.float32)
    latents, noise, x0s, previews = [], [], [], []
    attention: dict[str, list[np.ndarray]] = {a.layer: [] for a in manifest.attention}
    for step, t in enumerate(scheduler.timesteps):
        sample = np.concatenate([latent.numpy()] * 2)
        out = graphs.run(
            denoiser, sample=sample, timestep=np.asarray([float(t)], np.float32), **text
        )
        uncond, cond = out["model_output"]
        guided = uncond + guidance_scale * (cond - uncond)
        for a in manifest.attention:
            attention[a.layer].append(out[a.output].reshape(*a.grid, -1))
        c = step_coefficients(scheduler, family, float(t), step)
        x0 = predict_x0(latent.numpy()[0], guided, c.alpha, c.sigma, c.input_scale, kind)
        x0 = x0.astype(np.float32)
        latents.append(latent.numpy()[0])
        noise.append(guided)
        x0s.append(x0)
        previews.append(graphs.run("preview", latent=x0[None])["image"][0])
        latent = scheduler.step(torch.from_numpy(guided[None]), t, latent).prev_sample
    image = graphs.run("vae", latent=latent.numpy())["image"][0]
    return LiveRun(
        ids=list(ids[1]),
        latents=np.stack(latents),
        noise_pred=np.stack(noise),
        pred_x0=np.stack(x0s),
        previews=np.stack(previews),
        image=image,
        timesteps=scheduler.timesteps.numpy(),
        attention={k: np.stack(v) for k, v in attention.items()},
    )
