"""Run the exported live graphs with onnxruntime in Python, the way the browser runs them.

What the live page draws before its own runtime is ready (:func:`first_run`, computed when
the page is written), the check of an export and the Python baseline of
``bench/bench_live.py``: the same
tokenizer, starting noise and scheduler as :func:`diffwidget.trace` (the pipeline's own),
but every network evaluated by onnxruntime from the shipped ``.onnx`` files. Its results
are compared with a trace of the same caption and seed in ``tests/models/test_live_export.py``.
"""

from __future__ import annotations

import base64
import gzip
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

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
            denoiser, sample=sample, timestep=np.asarray([float(t)], "float32"), **text
        )
        uncond, cond = out["model_output"]
        guided = uncond + guidance_scale * (cond - uncond)
        for a in manifest.attention:
            attention[a.layer].append(out[a.output].reshape(*a.grid, -1))
        c = step_coefficients(scheduler, family, float(t), step)
        x0 = predict_x0(latent.numpy()[0], guided, c.alpha, c.sigma, c.input_scale, kind)
        x0 = x0.astype("float32")
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


#: How a first-run array travels: float16 (the guided noise prediction), or bytes, each
#: value ``byte * scale`` (previews and the image with scale 1; attention quantised).
Encoding = Literal["float16", "uint8"]
#: Quantisation levels of the embedded attention (one scale per layer: max / 255).
ATTENTION_LEVELS = 255
GZIP_LEVEL = 9


@dataclass(frozen=True)
class ArrayPayload:
    """One array as the page reads it (``FirstArray`` in ``js/src/live/first.ts``).

    ``data`` is base64 of the gzip of the little-endian values, row by row; with ``delta``
    (bytes only) each row after the first holds its difference from the row before,
    modulo 256: steps change little, so the differences compress several times better.
    """

    encoding: Encoding
    shape: list[int]
    scale: float
    delta: bool
    data: str


def _payload(
    array: np.ndarray, encoding: Encoding, *, scale: float = 1.0, delta: bool = False
) -> ArrayPayload:
    if encoding == "float16":
        values = np.ascontiguousarray(array, dtype="<f2")
    else:
        values = np.ascontiguousarray(array, dtype=np.uint8)
        if delta:
            values = np.diff(values.astype(np.int16), axis=0, prepend=0).astype(np.uint8)
    packed = gzip.compress(values.tobytes(), GZIP_LEVEL, mtime=0)
    return ArrayPayload(
        encoding=encoding,
        shape=list(array.shape),
        scale=float(scale),
        delta=delta,
        data=base64.b64encode(packed).decode("ascii"),
    )


def _quantised(maps: np.ndarray) -> ArrayPayload:
    """Attention as bytes: one scale (max / 255) for the layer, each step a delta row."""
    top = float(maps.max())
    scale = top / ATTENTION_LEVELS if top > 0 else 1.0
    levels = np.clip(np.round(maps / scale), 0, ATTENTION_LEVELS)
    return _payload(levels, "uint8", scale=scale, delta=True)


@dataclass(frozen=True)
class FirstRun:
    """The page's first caption generated ahead (``FirstRunPayload`` in ``js/src/live``).

    What the page needs to rebuild its own ``LiveRun`` for one model, caption, seed, step
    count and guidance scale without a network: the guided noise prediction per step (the
    page replays its seeded noise and sampler on it for the latents and x̂0), each step's
    preview, the final image and the attention maps, quantised to 8 bits per layer. The
    explorer draws it while onnxruntime-web compiles; the page's runtime computes the same
    run (``tests/browser/test_browser_live.py`` checks it).
    """

    model: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    #: Text positions kept (as a trace keeps by default).
    selected: list[int]
    timesteps: list[int]
    #: ``[steps, C * h * w]`` float16: the guided noise prediction of each step.
    noise_pred: ArrayPayload
    #: ``[steps, H * W * 3]`` bytes: each step's x̂0 preview.
    previews: ArrayPayload
    #: Layer path -> ``[steps, h * w * len(selected)]`` (conditional half, 8-bit).
    attention: dict[str, ArrayPayload]
    #: ``[1, H * W * 3]`` bytes: the final decode.
    image: ArrayPayload

    def __post_init__(self) -> None:
        per_step = [self.noise_pred, self.previews, *self.attention.values()]
        if len(self.timesteps) != self.steps or any(p.shape[0] != self.steps for p in per_step):
            raise ValueError(f"a first run of {self.steps} steps holds arrays of another length")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (what the page's config embeds)."""
        return asdict(self)


def first_run(
    model: str,
    prompt: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    graphs: LiveGraphs | None = None,
) -> FirstRun:
    """Generate ``prompt`` through the exported graphs as the live page's first image.

    Parameters
    ----------
    model : {"unet", "dit"}
        The embedded model.
    prompt : str
        The caption the page shows first.
    seed : int
        The page's default seed.
    steps, guidance_scale : optional
        The manifest's defaults (the page's) when left out.
    graphs : LiveGraphs, optional
        Sessions to reuse (made for ``model`` when left out).

    Examples
    --------
    >>> run = first_run("unet", "a large red circle on the left")  # doctest: +SKIP
    >>> run.previews.shape  # doctest: +SKIP
    [20, 12288]
    """
    from diffwidget.models.loader import DEMO_MODELS, DemoModel, load_demo_pipeline
    from diffwidget.tracing.families import denoiser_family

    if model not in DEMO_MODELS:
        raise ValueError(f"model must be one of {DEMO_MODELS}, got {model!r}")

    graphs = graphs if graphs is not None else LiveGraphs(model)
    manifest = graphs.manifest
    steps = steps if steps is not None else manifest.default_steps
    guidance = guidance_scale if guidance_scale is not None else manifest.default_guidance
    pipe = load_demo_pipeline(cast("DemoModel", model))
    run = generate(graphs, pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance)
    selected = denoiser_family(pipe).prompt_tokens(prompt, {}).select("default")

    def flat(array: np.ndarray) -> np.ndarray:
        return array.reshape(array.shape[0], -1)

    return FirstRun(
        model=model,
        prompt=prompt,
        seed=seed,
        steps=steps,
        guidance=float(guidance),
        selected=[int(i) for i in selected],
        timesteps=[int(t) for t in np.round(run.timesteps)],
        noise_pred=_payload(flat(run.noise_pred), "float16"),
        previews=_payload(flat(run.previews), "uint8", delta=True),
        attention={
            layer: _quantised(flat(maps[..., selected])) for layer, maps in run.attention.items()
        },
        image=_payload(run.image.reshape(1, -1), "uint8"),
    )
