"""Load the embedded demo model shipped inside the package, offline.

The weights live in ``diffwidget/models/demo/`` in the standard diffusers layout
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), stored in float16 to keep the package small and loaded in float32.
They are the output of :mod:`diffwidget.models.train`; ``export_demo_weights`` copies a
training checkpoint there.

Command (copy the newest checkpoint of a run into the package)::

    python -m diffwidget.models.loader --export runs/cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget._threads import use_tiny_model_threads
from diffwidget.models.architecture import SchedulerName, make_scheduler

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

DEMO_DIR = Path(__file__).resolve().parent / "demo"
MODEL_INDEX = "model_index.json"
PROVENANCE_FILE = "training.json"
#: Sampling settings the adherence evaluation was run with (see bench/RESULTS_model.md).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0  # meets every adherence goal (bench/RESULTS_model.md)
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


def load_demo_pipeline(
    device: str = "cpu",
    *,
    scheduler: SchedulerName = "dpm++",
    path: str | Path | None = None,
) -> StableDiffusionPipeline:
    """The embedded text-to-image model, ready to run, without touching the network.

    Parameters
    ----------
    device : str
        Torch device to move the pipeline to.
    scheduler : {"dpm++", "ddim", "euler", "ddpm"}
        Inference scheduler; DPM-Solver++ (2nd order) by default, as in the paper.
    path : str or Path, optional
        A pipeline folder to load instead of the shipped weights (e.g. a training
        checkpoint).

    Returns
    -------
    StableDiffusionPipeline
        float32, 64x64 images (the default size), progress bar disabled. Use about 20
        steps and ``guidance_scale=3`` (``DEFAULT_GUIDANCE``), which
        :func:`diffwidget.trace` picks up; the pipeline's own default is 7.5. torch is set
        to one CPU thread unless you chose a count (``DIFFWIDGET_THREADS=N`` to change).

    Raises
    ------
    FileNotFoundError
        If the weights are missing; the message says how to produce them.

    Examples
    --------
    >>> pipe = load_demo_pipeline()
    >>> image = pipe("a large red circle on the left", num_inference_steps=20,
    ...              guidance_scale=3.0, output_type="np").images[0]
    >>> image.shape
    (64, 64, 3)
    """
    import torch

    folder = Path(path) if path is not None else DEMO_DIR
    if not demo_weights_available(folder):
        raise FileNotFoundError(
            f"no embedded model weights in {folder} ({MODEL_INDEX} missing). Train them with "
            "`python -m diffwidget.models.train --config cpu --out runs/cpu` and copy them with "
            "`python -m diffwidget.models.loader --export runs/cpu`, or use "
            "`diffwidget.models.architecture.build_demo_pipeline(seed=0)` for the same "
            "architecture with random weights."
        )
    with _quiet_diffusers():
        # Importing the pipeline class makes transformers warn that torchvision is absent.
        from diffusers import StableDiffusionPipeline

        pipe: Any = StableDiffusionPipeline.from_pretrained(
            str(folder),
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        # The shipped weights are float16 on disk; CPUs want float32. Converting after
        # loading (the dtype argument's name differs across diffusers versions); the
        # architecture has no modules that must stay float32, so the cast is exact.
        pipe = pipe.to(device=device, dtype=torch.float32)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    # diffwidget.trace() reads this when no guidance_scale is given.
    pipe.recommended_guidance_scale = DEFAULT_GUIDANCE
    use_tiny_model_threads()
    return pipe


def export_demo_weights(source: str | Path, dest: str | Path = DEMO_DIR) -> Path:
    """Copy a training checkpoint into ``dest`` as float16 safetensors.

    Parameters
    ----------
    source : str or Path
        A checkpoint folder, or a training output folder (its newest checkpoint is used).
    dest : str or Path
        Target folder, replaced as a whole (written next to it first, then renamed).

    Returns
    -------
    Path
        ``dest``.
    """
    import torch

    from diffwidget.models.train import LATEST_FILE, latest_checkpoint

    source = Path(source)
    if (source / LATEST_FILE).is_file():
        source = latest_checkpoint(source)
    pipe: Any = load_demo_pipeline(path=source)
    pipe.to(torch.float16)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _quiet_diffusers():
        pipe.save_pretrained(tmp, safe_serialization=True)
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
    """Command-line entry point: ``--export RUN_OR_CHECKPOINT``."""
    parser = argparse.ArgumentParser(description="Copy trained weights into the package.")
    parser.add_argument("--export", required=True, help="training output or checkpoint folder")
    parser.add_argument("--dest", default=str(DEMO_DIR))
    args = parser.parse_args(argv)
    dest = export_demo_weights(args.export, args.dest)
    print(f"exported to {dest} ({weights_size_bytes(dest) / 1e6:.1f} MB of safetensors)")


if __name__ == "__main__":
    main()
