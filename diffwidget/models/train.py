"""Training recipe of the embedded models (the UNet and its DiT twin).

Two stages, both on scenes drawn from :class:`~diffwidget.models.scenes.SceneWorld`:

1. the VAE learns to reconstruct 64x64 scenes through a 4x16x16 latent (L1 + MSE and a very
   small KL term, as in Stable Diffusion); its ``scaling_factor`` is set to 1 / std of the
   latents of the training set. ``--vae FOLDER`` reuses a trained VAE instead (both models
   share one);
2. the latents of a fixed training set (captions worded with the variations of
   :meth:`SceneWorld.sample`) are computed once, then the denoiser and its text encoders
   learn jointly, with 10 % of captions replaced by the empty prompt so that
   classifier-free guidance works, and an exponential moving average (EMA) of the weights,
   which is what the checkpoints hold. The denoiser's objective
   (:mod:`diffwidget.models.objectives`):

   * ``--model unet``: the velocity v under a noise schedule rescaled to zero terminal SNR,
     Min-SNR loss weighting;
   * ``--model dit``: rectified flow (the target is noise - x0) with SD3's logit-normal
     sampling of the noise level, on the text layout of the SD3 pipeline
     (:mod:`diffwidget.models.dit`).

   ``--init FOLDER`` starts stage 2 from a trained pipeline of the same model (fine-tuning,
   the ``finetune`` config).

Checkpoints are complete pipeline folders, written to a temporary folder and renamed (so a
reader never sees half a checkpoint); ``OUT/latest`` names the newest.
``OUT/resume.safetensors`` holds the raw weights, the EMA, the optimiser and the random state
of the newest checkpoint: running the same command again continues from there. Training state
is stored without pickle (:mod:`diffwidget.models.state_io`), so a run folder from someone else
runs no code; the ``.pt`` files of older runs are read with ``torch.load(weights_only=True)``.

Commands (settings in :mod:`diffwidget.models.recipes`)::

    python -m diffwidget.models.train --config full --out runs/full --device cuda  # GPU
    python -m diffwidget.models.train --config cpu --out runs/cpu --threads 1      # CPU
    python -m diffwidget.models.train --model dit --config cpu --out runs/dit --threads 1 \\
        --vae diffwidget/models/demo/vae      # the DiT, on the UNet's VAE
    python -m diffwidget.models.train --config smoke --out /tmp/smoke          # seconds

then ``python -m diffwidget.models.loader --export runs/cpu`` (``--model dit --export
runs/dit`` for the DiT) copies the newest checkpoint into the package. A stage-2 step count
(``--unet-steps``) replaces its time cap; the learning rate is constant after the warm-up,
so a run stopped at checkpoint N equals a run with ``--unet-steps N``.
bench/RESULTS_model.md records the exact commands of the shipped weights;
``train_state.json`` in each checkpoint (``training.json`` in the package) records the
steps actually done.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget.models.architecture import build_components
from diffwidget.models.objectives import LatentSet, Objective, UNetObjective, init_from_pipeline
from diffwidget.models.recipes import CONFIGS, ModelName, TrainConfig
from diffwidget.models.scenes import SceneWorld
from diffwidget.models.state_io import load_state, save_state

ENCODE_BATCH = 256
LATEST_FILE = "latest"
VAE_FOLDER = "vae_stage1"
DATA_FILE = "latents.safetensors"
RESUME_FILE = "resume.safetensors"
#: What older versions wrote instead (pickles, read with ``weights_only=True`` only).
LEGACY_SUFFIX = ".pt"
KEEP_CHECKPOINTS = 2
LOG_EVERY = 50


def _to_tensor(images: list[np.ndarray]) -> Any:
    import torch

    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _log(out: Path, record: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_vae(
    vae: Any, config: TrainConfig, world: SceneWorld, out: Path, progress: bool, device: str
) -> int:
    """Stage 1: train the VAE on freshly drawn scenes; returns the steps done."""
    import torch
    from tqdm import tqdm

    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = time.monotonic()
    bar = tqdm(range(config.vae_steps), desc="vae", disable=not progress, mininterval=10)
    step = 0
    for step in bar:
        if config.vae_minutes is not None and time.monotonic() - start > 60 * config.vae_minutes:
            break
        images = _to_tensor([s.image for s in world.sample(config.vae_batch)]).to(device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - images).abs().mean()
        mse = (recon - images).pow(2).mean()
        kl = posterior.kl().mean() / images[0].numel()
        loss = l1 + mse + config.vae_kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        if step % LOG_EVERY == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}")
            _log(out, {"stage": "vae", "step": step, "l1": l1.item(), "mse": mse.item()})
    else:
        step = config.vae_steps
    vae.eval()
    return step


def encode_dataset(
    vae: Any, tokenizer: Any, world: SceneWorld, n_scenes: int, progress: bool, device: str = "cpu"
) -> LatentSet:
    """Draw the fixed stage-2 training set (captions with variations) and encode it once."""
    import torch
    from tqdm import tqdm

    means, stds, captions = [], [], []
    with torch.no_grad():
        for first in tqdm(
            range(0, n_scenes, ENCODE_BATCH), desc="encode", disable=not progress, mininterval=10
        ):
            scenes = world.sample(min(ENCODE_BATCH, n_scenes - first), variations=True)
            posterior = vae.encode(_to_tensor([s.image for s in scenes]).to(device)).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
            captions += [s.caption for s in scenes]

    def ids(texts: list[str]) -> Any:
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return LatentSet(torch.cat(means), torch.cat(stds), ids(captions), ids([""]), captions)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[Any], decay: float) -> None:
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules

    def update(self, step: int) -> None:
        import torch

        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, module in zip(self.shadow, self.modules, strict=True):
                for s, p in zip(shadow.parameters(), module.parameters(), strict=True):
                    s.lerp_(p.detach(), 1.0 - decay)


def save_checkpoint(pipe: Any, out: Path, name: str, state: dict[str, Any]) -> Path:
    """Save a pipeline folder atomically (temp folder, then rename) and point ``latest`` at it."""
    final = out / name
    tmp = out / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "train_state.json").write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = out / f".{LATEST_FILE}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, out / LATEST_FILE)
    checkpoints = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    for old in checkpoints[:-KEEP_CHECKPOINTS]:
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out: str | Path) -> Path:
    """Folder of the newest checkpoint of a training run."""
    out = Path(out)
    pointer = out / LATEST_FILE
    if not pointer.exists():
        raise FileNotFoundError(f"no checkpoint in {out} yet: {pointer} is missing")
    return out / pointer.read_text().strip()


def _read_state(path: Path, device: str = "cpu") -> Any:
    """Training state written by :func:`save_state`, or the ``.pt`` an older version wrote.

    Returns ``None`` when neither exists. An old ``.pt`` is read with ``weights_only=True``:
    tensors, containers and numbers only, never code.
    """
    if path.exists():
        return load_state(path, device)
    legacy = path.with_suffix(LEGACY_SUFFIX)
    if legacy.exists():
        import torch

        return torch.load(legacy, map_location=device, weights_only=True)
    return None


def _stage1(
    components: dict[str, Any],
    config: TrainConfig,
    out: Path,
    seed: int,
    vae_from: str | Path | None,
    state: dict[str, Any],
    progress: bool,
    device: str,
) -> Any:
    """The trained VAE: from ``OUT/vae_stage1``, from ``vae_from``, or trained now."""
    from diffusers import AutoencoderKL

    vae_dir = out / VAE_FOLDER
    if not vae_dir.exists() and vae_from is not None:
        shutil.copytree(vae_from, out / f".tmp-{VAE_FOLDER}")
        (out / f".tmp-{VAE_FOLDER}").rename(vae_dir)
        state["vae_from"] = str(vae_from)
    if vae_dir.exists():
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).float()
        state.setdefault("vae_steps_done", "loaded from " + str(vae_dir))
    else:
        vae = components["vae"].to(device)
        state["vae_steps_done"] = train_vae(
            vae, config, SceneWorld(seed + 1), out, progress, device
        )
        vae.save_pretrained(out / f".tmp-{VAE_FOLDER}")
        (out / f".tmp-{VAE_FOLDER}").rename(vae_dir)
    # The SD3 pipeline decodes latents / scaling_factor + shift_factor: both models share
    # one VAE whose shift is zero (the UNet's pipeline does not read it).
    vae.register_to_config(shift_factor=0.0)
    return vae.to(device).requires_grad_(False).eval()


def _objective(
    model: ModelName, seed: int, config: TrainConfig, device: str
) -> tuple[dict[str, Any], Objective]:
    if model == "unet":
        components = build_components(seed)
        return components, UNetObjective(components, config, device)
    if model == "dit":
        from diffwidget.models.dit import build_dit_components
        from diffwidget.models.objectives import FlowObjective

        components = build_dit_components(seed)
        return components, FlowObjective(components, config, device)
    raise ValueError(f"unknown model {model!r}: choose 'unet' or 'dit'")


@dataclass(frozen=True)
class _TrainingSet:
    """The encoded stage-2 training set, its latents' moments on the device, and their scale."""

    data: LatentSet
    mean: Any
    std: Any
    scale: float


@dataclass(frozen=True)
class _Stage2:
    """What the stage-2 loop trains, and what a checkpoint saves of it."""

    model: ModelName
    config: TrainConfig
    device: str
    out: Path
    #: Written into each checkpoint's ``train_state.json``; the loop adds the steps done.
    state: dict[str, Any]
    #: ``time.monotonic()`` at the start of the run (stage 1 included).
    t0: float
    objective: Objective
    vae: Any
    params: list[Any]
    optimiser: Any
    ema: Ema
    generator: Any


@dataclass(frozen=True)
class _Resumed:
    """Where stage 2 starts: from scratch, or from ``OUT/resume.safetensors``."""

    step: int = 0
    running: float = 0.0  # the smoothed loss shown on the progress bar and logged
    stage2_s: float = 0.0  # stage-2 seconds already spent, which the time cap counts


def _training_set(
    vae: Any,
    components: dict[str, Any],
    config: TrainConfig,
    out: Path,
    seed: int,
    state: dict[str, Any],
    progress: bool,
    device: str,
) -> _TrainingSet:
    """The latents from ``OUT/latents.safetensors``, or encoded now; sets the VAE's scale."""
    data_file = out / DATA_FILE
    stored = _read_state(data_file)
    if stored is not None:
        data = LatentSet(**stored)
    else:
        data = encode_dataset(
            vae, components["tokenizer"], SceneWorld(seed), config.n_scenes, progress, device
        )
        save_state(asdict(data), data_file)
    scale = 1.0 / float(data.mean.std())
    vae.register_to_config(scaling_factor=scale)
    state["scaling_factor"] = scale
    return _TrainingSet(data, data.mean.to(device), data.std.to(device), scale)


def _trained_params(
    objective: Objective,
    components: dict[str, Any],
    init_from: str | Path | None,
    state: dict[str, Any],
    device: str,
) -> list[Any]:
    """Put the trained modules on the device in training mode (fine-tuned from ``init_from``)."""
    if init_from is not None:
        init_from_pipeline(objective, components, Path(init_from))
        state["init_from"] = str(init_from)
    for module in objective.trained:
        module.to(device).train()
    return [p for module in objective.trained for p in module.parameters()]


def _resume(run: _Stage2) -> _Resumed:
    """Load ``OUT/resume.safetensors`` into ``run`` if a previous run left one."""
    saved = _read_state(run.out / RESUME_FILE, run.device)
    if saved is None:
        return _Resumed()
    for module, weights in zip(run.objective.trained, saved["trained"], strict=True):
        module.load_state_dict(weights)
    for shadow, weights in zip(run.ema.shadow, saved["ema"], strict=True):
        shadow.load_state_dict(weights)
    run.optimiser.load_state_dict(saved["optimiser"])
    run.generator.set_state(saved["generator"].cpu())  # generator states are CPU byte tensors
    run.state["resumed_at"] = [*saved.get("resumed_at", []), saved["step"]]
    return _Resumed(saved["step"], saved["running"], saved["stage2_s"])


def _checkpoint(run: _Stage2, step: int, running: float, stage2_s: float) -> Path:
    """Save the EMA pipeline after ``step`` steps and the state to resume from there."""
    run.state.update(
        unet_steps_done=step, stage2_minutes=stage2_s / 60, minutes=(time.monotonic() - run.t0) / 60
    )
    final = save_checkpoint(
        run.objective.pipeline(run.ema.shadow, run.vae),
        run.out,
        f"checkpoint-{step:06d}",
        run.state,
    )
    resume = {
        "step": step,
        "trained": [m.state_dict() for m in run.objective.trained],
        "ema": [m.state_dict() for m in run.ema.shadow],
        "optimiser": run.optimiser.state_dict(),
        "generator": run.generator.get_state(),
        "running": running,
        "stage2_s": stage2_s,
        "resumed_at": run.state.get("resumed_at", []),
    }
    save_state(resume, run.out / RESUME_FILE)
    return final


def _train_step(run: _Stage2, latents: _TrainingSet, step: int) -> Any:
    """One optimiser step on a batch drawn from the training set; returns the loss."""
    import torch

    config, generator, device = run.config, run.generator, run.device
    # Each latent is sampled afresh from its posterior, as the VAE would encode it.
    idx = torch.randint(
        0, latents.mean.shape[0], (config.batch,), generator=generator, device=device
    )
    eps = torch.randn(latents.mean[idx].shape, generator=generator, device=device)
    sample = (latents.mean[idx] + latents.std[idx] * eps) * latents.scale
    loss = run.objective.loss(sample, idx, latents.data, generator)
    for group in run.optimiser.param_groups:
        group["lr"] = config.lr * _lr_factor(step, config.warmup)
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimiser.step()
    run.ema.update(step)
    return loss


def _run_stage2(run: _Stage2, latents: _TrainingSet, resumed: _Resumed, progress: bool) -> Path:
    """Train until the step count or the time cap; returns the final checkpoint folder."""
    from tqdm import tqdm

    config, running = run.config, resumed.running
    start = last_save = time.monotonic()
    bar = tqdm(
        range(resumed.step, config.unet_steps),
        desc=run.model,
        disable=not progress,
        mininterval=10,
        initial=resumed.step,
        total=config.unet_steps,
    )
    step = resumed.step
    for step in bar:
        elapsed = resumed.stage2_s + time.monotonic() - start
        if config.unet_minutes is not None and elapsed > 60 * config.unet_minutes:
            break
        loss = _train_step(run, latents, step)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            t = time.monotonic() - run.t0
            _log(run.out, {"stage": run.model, "step": step, "loss": running, "t": t})
        if time.monotonic() - last_save > 60 * config.checkpoint_minutes:
            _checkpoint(run, step + 1, running, resumed.stage2_s + time.monotonic() - start)
            last_save = time.monotonic()
    else:
        step = config.unet_steps
    return _checkpoint(run, step, running, resumed.stage2_s + time.monotonic() - start)


def train(
    config: TrainConfig,
    out: str | Path,
    seed: int = 0,
    progress: bool = True,
    *,
    model: ModelName = "unet",
    device: str = "cpu",
    vae_from: str | Path | None = None,
    init_from: str | Path | None = None,
) -> Path:
    """Run both stages and return the final checkpoint folder.

    Parameters
    ----------
    config : TrainConfig
        Settings (see :data:`CONFIGS`).
    out : str or Path
        Output folder. If ``OUT/vae_stage1`` exists, stage 1 is skipped and that VAE used;
        if ``OUT/resume.safetensors`` exists, stage 2 continues from it.
    seed : int
        Seed of the weights, the scenes and the training noise.
    progress : bool
        Show progress bars.
    model : {"unet", "dit"}
        Which denoiser to train.
    device : str
        Torch device; the same code runs on CPU and GPU.
    vae_from : str or Path, optional
        A trained VAE folder to use instead of stage 1 (copied to ``OUT/vae_stage1``).
    init_from : str or Path, optional
        A pipeline folder of the same model to fine-tune (:func:`init_from_pipeline`)
        instead of training stage 2 from random weights.
    """
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    components, objective = _objective(model, seed, config, device)
    state: dict[str, Any] = {
        "model": model,
        "config": asdict(config),
        "seed": seed,
        "device": device,
        "torch": torch.__version__,
    }
    t0 = time.monotonic()
    vae = _stage1(components, config, out, seed, vae_from, state, progress, device)
    state["vae_minutes"] = (time.monotonic() - t0) / 60
    latents = _training_set(vae, components, config, out, seed, state, progress, device)
    state["encode_minutes"] = (time.monotonic() - t0) / 60 - state["vae_minutes"]

    params = _trained_params(objective, components, init_from, state, device)
    run = _Stage2(
        model=model,
        config=config,
        device=device,
        out=out,
        state=state,
        t0=t0,
        objective=objective,
        vae=vae,
        params=params,
        optimiser=torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2),
        ema=Ema(objective.trained, config.ema_decay),
        generator=torch.Generator(device).manual_seed(seed),
    )
    return _run_stage2(run, latents, _resume(run), progress)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("unet", "dit"), default="unet")
    parser.add_argument("--config", choices=("full", "cpu", "finetune", "smoke"), default="cpu")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--vae", default=None, help="trained VAE folder to reuse (skips stage 1)")
    parser.add_argument("--init", default=None, help="pipeline folder to fine-tune (stage 2)")
    parser.add_argument("--vae-minutes", type=float, default=None, help="cap on stage 1")
    parser.add_argument("--unet-minutes", type=float, default=None, help="cap on stage 2")
    parser.add_argument("--vae-steps", type=int, default=None, help="steps of stage 1")
    parser.add_argument("--unet-steps", type=int, default=None, help="steps of stage 2")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # Denormal floats slow CPU kernels by orders of magnitude; their value never matters here.
    torch.set_flush_denormal(True)
    config = CONFIGS[args.model][args.config]
    if args.vae_minutes is not None:
        config = replace(config, vae_minutes=args.vae_minutes)
    if args.unet_minutes is not None:
        config = replace(config, unet_minutes=args.unet_minutes)
    # A step count replaces the stage's time cap, so that a run can be repeated exactly.
    if args.vae_steps is not None:
        config = replace(config, vae_steps=args.vae_steps, vae_minutes=args.vae_minutes)
    if args.unet_steps is not None:
        config = replace(config, unet_steps=args.unet_steps, unet_minutes=args.unet_minutes)
    try:
        final = train(
            config,
            args.out,
            seed=args.seed,
            progress=not args.no_progress,
            model=args.model,
            device=args.device,
            vae_from=args.vae,
            init_from=args.init,
        )
    finally:
        # The flag is process-wide (the CPU's FTZ/DAZ bits): a caller in the same process,
        # a test run for one, keeps IEEE arithmetic.
        torch.set_flush_denormal(False)
    print(f"final checkpoint: {final}", file=sys.stderr)


if __name__ == "__main__":
    main()
