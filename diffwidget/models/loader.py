"""Load the embedded demo models shipped inside the package, offline.

Two models, trained on the same scene world and sharing one VAE:

* ``"unet"`` (the default): a ``StableDiffusionPipeline`` in ``diffwidget/models/demo/``
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``);
* ``"dit"``: a ``StableDiffusion3Pipeline`` (MMDiT, see :mod:`diffwidget.models.dit`) in
  ``diffwidget/models/demo_dit/``, whose folder has no ``vae/``: it loads the UNet's.

Weights are stored in float16 to keep the package small and loaded in float32. They are the
output of :mod:`diffwidget.models.train`; ``export_demo_weights`` copies a training checkpoint
there. Every loaded pipeline carries ``recommended_guidance_scale`` and ``check_prompt``
(:func:`diffwidget.models.prompts.check_prompt`), and its tokenizers normalise case,
punctuation and the spelling "center" (:mod:`diffwidget.models.tokenizer`).

Commands (copy the newest checkpoint of a run into the package)::

    python -m diffwidget.models.loader --export runs/cpu
    python -m diffwidget.models.loader --model dit --export runs/dit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeGuard, cast, get_args

from diffwidget._threads import use_tiny_model_threads
from diffwidget.models.architecture import SchedulerName, make_scheduler
from diffwidget.models.prompts import check_prompt
from diffwidget.models.tokenizer import use_caption_normalizer

DemoModel = Literal["unet", "dit"]
DEMO_MODELS: tuple[str, ...] = get_args(DemoModel)
#: The model ``load_demo_pipeline()`` loads when none is named ("unet" when unset);
#: ``diffwidget demo --model dit`` sets it for the notebooks' kernels.
DEMO_MODEL_ENV = "DIFFWIDGET_DEMO_MODEL"
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DIT_DIR = Path(__file__).resolve().parent / "demo_dit"
DEMO_DIRS: dict[str, Path] = {"unet": DEMO_DIR, "dit": DIT_DIR}
SHARED_VAE_DIR = DEMO_DIR / "vae"
MODEL_INDEX = "model_index.json"
PROVENANCE_FILE = "training.json"
#: Sampling settings the adherence evaluation was run with (see bench/RESULTS_model.md).
DEFAULT_STEPS = 20
#: Guidance scale per model; each meets the adherence goals (bench/RESULTS_model.md).
RECOMMENDED_GUIDANCE: dict[str, float] = {"unet": 3.0, "dit": 4.0}
DEFAULT_GUIDANCE = RECOMMENDED_GUIDANCE["unet"]
IMAGE_SIZE = 64


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence advice to install optional packages (accelerate, torchvision) and loading bars.

    Loading takes well under a second, so the libraries' progress bars are noise here; every
    setting is restored afterwards. Errors still show.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    level = diffusers_logging.get_verbosity()
    transformers_level = transformers_logging.get_verbosity()
    diffusers_bars = diffusers_logging.is_progress_bar_enabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        transformers_logging.set_verbosity(transformers_level)
        if diffusers_bars:
            diffusers_logging.enable_progress_bar()
        if transformers_bars:
            transformers_logging.enable_progress_bar()


def demo_weights_available(path: str | Path = DEMO_DIR) -> bool:
    """Whether a complete pipeline folder exists at ``path``."""
    return (Path(path) / MODEL_INDEX).is_file()


def is_demo_model(model: str) -> TypeGuard[DemoModel]:
    """Whether ``model`` names an embedded model (``DEMO_MODELS``).

    Examples
    --------
    >>> is_demo_model("unet"), is_demo_model("sd15")
    (True, False)
    """
    return model in DEMO_MODELS


def _check_model(model: str) -> None:
    if not is_demo_model(model):
        raise ValueError(
            f"unknown embedded model {model!r}: choose 'unet' (the default, a Stable Diffusion "
            f"layout) or 'dit' (an SD3-style MMDiT), e.g. load_demo_pipeline('dit')"
        )


def _pipeline_class_name(folder: Path) -> str:
    return str(json.loads((folder / MODEL_INDEX).read_text()).get("_class_name", ""))


def load_demo_pipeline(
    model: DemoModel | None = None,
    device: str = "cpu",
    *,
    scheduler: SchedulerName | None = None,
    path: str | Path | None = None,
) -> Any:
    """An embedded text-to-image model, ready to run, without touching the network.

    Parameters
    ----------
    model : {"unet", "dit"}, optional
        The UNet (``StableDiffusionPipeline``, the default) or its DiT twin
        (``StableDiffusion3Pipeline`` with an MMDiT), trained on the same scene world.
        When omitted: the value of the environment variable ``DIFFWIDGET_DEMO_MODEL``
        (set by ``diffwidget demo --model``), else ``"unet"``.
    device : str
        Torch device to move the pipeline to.
    scheduler : {"dpm++", "ddim", "euler", "ddpm"}, optional
        UNet only: the inference scheduler; DPM-Solver++ (2nd order) by default, as in the
        paper. The DiT always uses its flow-matching Euler scheduler.
    path : str or Path, optional
        A pipeline folder to load instead of the shipped weights (e.g. a training
        checkpoint of the same model).

    Returns
    -------
    StableDiffusionPipeline or StableDiffusion3Pipeline
        float32, 64x64 images (the default size), progress bar disabled. Use about 20
        steps; ``pipe.recommended_guidance_scale`` (3 for the UNet, 4 for the DiT) is the
        guidance scale the adherence evaluation used, which :func:`diffwidget.trace` picks
        up (the pipelines' own defaults are 7.5 and 7). ``pipe.check_prompt(prompt)`` warns
        once about words outside the models' vocabulary. torch is set to one CPU thread
        unless you chose a count (``DIFFWIDGET_THREADS=N`` to change).

    Raises
    ------
    ValueError
        For an unknown ``model``, a scheduler asked of the DiT, or a ``path`` holding the
        other model.
    FileNotFoundError
        If the weights are missing; the message says how to produce them.

    Examples
    --------
    >>> pipe = load_demo_pipeline()
    >>> image = pipe("a large red circle on the left", num_inference_steps=20,
    ...              guidance_scale=3.0, output_type="np").images[0]
    >>> image.shape
    (64, 64, 3)
    >>> dit = load_demo_pipeline("dit")
    >>> type(dit.transformer).__name__
    'SD3Transformer2DModel'
    """
    model = _chosen_model(model, scheduler)
    folder = _pipeline_folder(model, path)
    pipe = _read_pipeline(model, folder, device)
    _prepare(pipe, model, scheduler)
    use_tiny_model_threads()
    return pipe


def _chosen_model(model: DemoModel | None, scheduler: SchedulerName | None) -> DemoModel:
    """The model asked for, else the environment's, else the UNet; checked against ``scheduler``."""
    chosen = model or os.environ.get(DEMO_MODEL_ENV) or "unet"
    _check_model(chosen)
    if chosen == "dit" and scheduler is not None:
        raise ValueError(
            f"scheduler={scheduler!r} is for the UNet; the DiT is a flow-matching model and "
            "always uses its FlowMatchEulerDiscreteScheduler: leave scheduler out"
        )
    return cast("DemoModel", chosen)  # checked just above


def _pipeline_folder(model: DemoModel, path: str | Path | None) -> Path:
    """The folder to load ``model`` from, checked to hold that model's pipeline."""
    folder = Path(path) if path is not None else DEMO_DIRS[model]
    if not demo_weights_available(folder):
        flag = " --model dit" if model == "dit" else ""
        raise FileNotFoundError(
            f"no embedded {model} weights in {folder} ({MODEL_INDEX} missing). Train them with "
            f"`python -m diffwidget.models.train{flag} --config cpu --out runs/{model}` and copy "
            f"them with `python -m diffwidget.models.loader{flag} --export runs/{model}`, or use "
            "`diffwidget.models.architecture.build_demo_pipeline(seed=0)` "
            "(`diffwidget.models.dit.build_dit_pipeline` for the DiT) for the same "
            "architecture with random weights."
        )
    expected = "StableDiffusion3Pipeline" if model == "dit" else "StableDiffusionPipeline"
    found = _pipeline_class_name(folder)
    if found != expected:
        raise ValueError(
            f"{folder} holds a {found or 'pipeline of unknown class'}, not the {model}'s "
            f"{expected}: pass model={'unet' if model == 'dit' else 'dit'!r} or another path"
        )
    return folder


def _read_pipeline(model: DemoModel, folder: Path, device: str) -> Any:
    """The pipeline in ``folder``, in float32 on ``device``, loaded without the network."""
    import torch

    with _quiet_diffusers():
        # Importing the pipeline classes makes transformers warn that torchvision is absent.
        from diffusers import AutoencoderKL, StableDiffusion3Pipeline, StableDiffusionPipeline

        pipe: Any
        if model == "unet":
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder),
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            # The shipped DiT has no vae/ of its own: both models share the UNet's.
            vae_dir = folder / "vae" if (folder / "vae").is_dir() else SHARED_VAE_DIR
            pipe = StableDiffusion3Pipeline.from_pretrained(
                str(folder),
                local_files_only=True,
                vae=AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True),
                text_encoder_3=None,
                tokenizer_3=None,
            )
        # The shipped weights are float16 on disk; CPUs want float32. Converting after
        # loading (the dtype argument's name differs across diffusers versions); the
        # architectures have no modules that must stay float32, so the cast is exact.
        return pipe.to(device=device, dtype=torch.float32)


def _prepare(pipe: Any, model: DemoModel, scheduler: SchedulerName | None) -> None:
    """Set the loaded pipeline up as documented: tokenizers, scheduler, guidance, prompt check."""
    if pipe.vae.config.get("shift_factor") is None:
        # Weights exported before the DiT existed; the SD3 pipeline adds this shift.
        pipe.vae.register_to_config(shift_factor=0.0)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            use_caption_normalizer(getattr(pipe, name))
    if model == "unet":
        pipe.scheduler = make_scheduler(scheduler or "dpm++", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    # diffwidget.trace() reads these: the guidance when none is given, the prompt check.
    pipe.recommended_guidance_scale = RECOMMENDED_GUIDANCE[model]
    pipe.check_prompt = check_prompt


def _same_vae(a: Path, b: Path) -> bool:
    """Whether two VAE folders hold the same weights and the same scaling factor."""
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    config_a = json.loads((a / "config.json").read_text())
    config_b = json.loads((b / "config.json").read_text())
    if config_a.get("scaling_factor") != config_b.get("scaling_factor"):
        return False
    weights_a, weights_b = load_file(str(a / name)), load_file(str(b / name))
    return weights_a.keys() == weights_b.keys() and all(
        bool((weights_a[k] == weights_b[k]).all()) for k in weights_a
    )


def export_demo_weights(
    source: str | Path,
    dest: str | Path | None = None,
    *,
    model: DemoModel = "unet",
    shared_vae: str | Path = SHARED_VAE_DIR,
) -> Path:
    """Copy a training checkpoint into ``dest`` as float16 safetensors.

    Parameters
    ----------
    source : str or Path
        A checkpoint folder, or a training output folder (its newest checkpoint is used).
    dest : str or Path, optional
        Target folder, replaced as a whole (written next to it first, then renamed); the
        model's folder in the package by default.
    model : {"unet", "dit"}
        Which model the checkpoint holds.
    shared_vae : str or Path
        DiT only: the UNet's VAE folder. The DiT is trained on that VAE, so its ``vae/`` is
        left out of ``dest`` (loaded from there), after checking the two are identical.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    ValueError
        If a DiT checkpoint's VAE differs from ``shared_vae``.
    """
    import torch

    from diffwidget.models.train import LATEST_FILE, latest_checkpoint

    _check_model(model)
    source = Path(source)
    if (source / LATEST_FILE).is_file():
        source = latest_checkpoint(source)
    pipe: Any = load_demo_pipeline(model, path=source)
    dest = Path(dest) if dest is not None else DEMO_DIRS[model]
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _quiet_diffusers():
        pipe.to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
    if model == "dit":
        if not _same_vae(tmp / "vae", Path(shared_vae)):
            shutil.rmtree(tmp)
            raise ValueError(
                f"the DiT checkpoint {source} was trained with another VAE than {shared_vae}: "
                "train it with `--vae` pointing at the UNet's VAE folder, or export the UNet "
                "from the run whose VAE the DiT used"
            )
        shutil.rmtree(tmp / "vae")
    state_file = source / "train_state.json"
    provenance: dict[str, Any] = {"checkpoint": source.name}
    if state_file.is_file():
        provenance.update(json.loads(state_file.read_text()))
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


def weights_size_bytes(path: str | Path = DEMO_DIR) -> int:
    """Total size of the safetensors files of a pipeline folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``[--model dit] --export RUN_OR_CHECKPOINT``."""
    parser = argparse.ArgumentParser(description="Copy trained weights into the package.")
    parser.add_argument("--model", choices=DEMO_MODELS, default="unet")
    parser.add_argument("--export", required=True, help="training output or checkpoint folder")
    parser.add_argument("--dest", default=None, help="target folder (default: the package's)")
    args = parser.parse_args(argv)
    dest = export_demo_weights(args.export, args.dest, model=args.model)
    print(f"exported to {dest} ({weights_size_bytes(dest) / 1e6:.1f} MB of safetensors)")


if __name__ == "__main__":
    main()
