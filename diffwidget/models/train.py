"""Training recipe of the embedded model.

Two stages, both on scenes drawn from :class:`~diffwidget.models.scenes.SceneWorld`:

1. the VAE learns to reconstruct 64x64 scenes through a 4x16x16 latent (L1 + MSE and a very
   small KL term, as in Stable Diffusion); its ``scaling_factor`` is set to 1 / std of the
   latents of the training set;
2. the latents of a fixed training set are computed once, then the UNet and the text encoder
   learn jointly to predict the velocity v (Salimans & Ho 2022) under a noise schedule
   rescaled to zero terminal SNR (see ``SCHEDULER_CONFIG``), with 10 % of captions replaced
   by the empty prompt so that classifier-free guidance works, Min-SNR loss weighting, and
   an exponential moving average (EMA) of both networks' weights, which is what the
   checkpoints hold.

Checkpoints are complete ``StableDiffusionPipeline`` folders, written to a temporary folder
and renamed (so a reader never sees half a checkpoint); ``OUT/latest`` names the newest.

Commands::

    python -m diffwidget.models.train --config full --out runs/full --seed 0   # GPU recipe
    python -m diffwidget.models.train --config cpu --out runs/cpu --seed 0     # 2-core CPU
    python -m diffwidget.models.train --config smoke --out /tmp/smoke          # seconds

then ``python -m diffwidget.models.loader --export runs/full`` copies the newest checkpoint
into the package. The shipped weights come from the ``cpu`` config, run as
``python -m diffwidget.models.train --config cpu --out runs/v --seed 0 --threads 1
--unet-steps 6375`` on a 2-core CPU (75 minutes for stage 2); ``train_state.json`` in each
checkpoint (``training.json`` in the package) records the steps actually done.
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
from typing import Any, Literal

import numpy as np

from diffwidget.models.architecture import assemble_pipeline, build_components
from diffwidget.models.scenes import SceneWorld

ConfigName = Literal["full", "cpu", "smoke"]
ENCODE_BATCH = 256
LATEST_FILE = "latest"
VAE_FOLDER = "vae_stage1"
KEEP_CHECKPOINTS = 2
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023: clamps the loss weight of low-noise timesteps
LOG_EVERY = 50


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    ``*_minutes`` cap a stage's wall-clock time (``None``: run all steps); the steps actually
    done are written to ``OUT/train_state.json``.
    """

    vae_steps: int
    vae_batch: int
    vae_lr: float
    vae_kl_weight: float
    n_scenes: int
    unet_steps: int
    batch: int
    lr: float
    warmup: int
    ema_decay: float
    caption_dropout: float
    checkpoint_minutes: float
    vae_minutes: float | None = None
    unet_minutes: float | None = None


CONFIGS: dict[str, TrainConfig] = {
    # The recipe for a GPU: larger training set, many more steps.
    "full": TrainConfig(
        vae_steps=6000,
        vae_batch=64,
        vae_lr=1e-3,
        vae_kl_weight=1e-6,
        n_scenes=100_000,
        unet_steps=60_000,
        batch=128,
        lr=5e-4,
        warmup=500,
        ema_decay=0.9995,
        caption_dropout=0.1,
        checkpoint_minutes=15.0,
    ),
    # What a 2-core CPU manages in about 75 minutes; stages end on their time caps.
    "cpu": TrainConfig(
        vae_steps=3000,
        vae_batch=8,
        vae_lr=1e-3,
        vae_kl_weight=1e-6,
        n_scenes=8_000,
        unet_steps=100_000,
        batch=32,
        lr=5e-4,
        warmup=200,
        ema_decay=0.999,
        caption_dropout=0.1,
        checkpoint_minutes=10.0,
        vae_minutes=16.0,
        unet_minutes=60.0,
    ),
    # Proves the recipe runs end to end (used by the tests).
    "smoke": TrainConfig(
        vae_steps=2,
        vae_batch=4,
        vae_lr=1e-3,
        vae_kl_weight=1e-6,
        n_scenes=16,
        unet_steps=3,
        batch=4,
        lr=5e-4,
        warmup=1,
        ema_decay=0.9,
        caption_dropout=0.1,
        checkpoint_minutes=60.0,
    ),
}


def _to_tensor(images: list[np.ndarray]) -> Any:
    import torch

    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _log(out: Path, record: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def train_vae(vae: Any, config: TrainConfig, world: SceneWorld, out: Path, progress: bool) -> int:
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
        images = _to_tensor([s.image for s in world.sample(config.vae_batch)])
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


@dataclass
class LatentSet:
    """Encoded training set: posterior mean/std of each latent, token ids of each caption."""

    mean: Any
    std: Any
    input_ids: Any
    empty_ids: Any


def encode_dataset(
    vae: Any, tokenizer: Any, world: SceneWorld, n_scenes: int, progress: bool
) -> LatentSet:
    """Draw the fixed stage-2 training set and encode it once."""
    import torch
    from tqdm import tqdm

    means, stds, captions = [], [], []
    with torch.no_grad():
        for first in tqdm(
            range(0, n_scenes, ENCODE_BATCH), desc="encode", disable=not progress, mininterval=10
        ):
            scenes = world.sample(min(ENCODE_BATCH, n_scenes - first))
            posterior = vae.encode(_to_tensor([s.image for s in scenes])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            captions += [s.caption for s in scenes]

    def ids(texts: list[str]) -> Any:
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return LatentSet(torch.cat(means), torch.cat(stds), ids(captions), ids([""]))


def min_snr_weights(noise_scheduler: Any) -> Any:
    """Per-timestep loss weights: Min-SNR (Hang et al. 2023) with SNR + 1 for v-prediction.

    In terms of the error of the predicted clean latent, an epsilon loss weighs timestep t by
    SNR(t) and a v loss by SNR(t) + 1; both are clamped at :data:`MIN_SNR_GAMMA` so that
    nearly clean timesteps do not dominate. For v-prediction the weight of the noisiest steps
    stays 1: with a zero terminal SNR those are where the prompt alone decides the layout.
    """
    import torch

    alphas = noise_scheduler.alphas_cumprod.to(torch.float64)
    snr = alphas / (1 - alphas).clamp(min=1e-12)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return (snr.clamp(max=MIN_SNR_GAMMA) / snr.clamp(min=1e-12)).float()
    if kind == "v_prediction":
        return ((snr + 1).clamp(max=MIN_SNR_GAMMA) / (snr + 1)).float()
    raise ValueError(f"training supports epsilon and v_prediction, not {kind!r}")


def training_target(noise_scheduler: Any, latents: Any, noise: Any, t: Any) -> Any:
    """What the UNet learns to output: the noise, or the velocity for v-prediction."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    return noise


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


def save_checkpoint(
    components: dict[str, Any], out: Path, name: str, state: dict[str, Any]
) -> Path:
    """Save a pipeline folder atomically (temp folder, then rename) and point ``latest`` at it."""
    pipe: Any = assemble_pipeline(components)
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


def train(config: TrainConfig, out: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """Run both stages and return the final checkpoint folder.

    If ``OUT/vae_stage1`` exists (from an earlier run with the same seed), stage 1 is
    skipped and that VAE is used.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    components = build_components(seed)
    vae, text_encoder, unet, tokenizer = (
        components["vae"],
        components["text_encoder"],
        components["unet"],
        components["tokenizer"],
    )
    state: dict[str, Any] = {"config": asdict(config), "seed": seed, "torch": torch.__version__}
    t0 = time.monotonic()

    vae_dir = out / VAE_FOLDER
    if vae_dir.exists():
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
        state["vae_steps_done"] = "loaded from " + str(vae_dir)
    else:
        state["vae_steps_done"] = train_vae(vae, config, SceneWorld(seed + 1), out, progress)
        vae.save_pretrained(out / f".tmp-{VAE_FOLDER}")
        (out / f".tmp-{VAE_FOLDER}").rename(vae_dir)
    vae.requires_grad_(False).eval()
    state["vae_minutes"] = (time.monotonic() - t0) / 60

    data = encode_dataset(vae, tokenizer, SceneWorld(seed), config.n_scenes, progress)
    scale = 1.0 / float(data.mean.std())
    vae.register_to_config(scaling_factor=scale)
    components["vae"] = vae
    state["scaling_factor"] = scale
    state["encode_minutes"] = (time.monotonic() - t0) / 60 - state["vae_minutes"]

    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    loss_weight = min_snr_weights(noise_scheduler)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    ema = Ema([unet, text_encoder], config.ema_decay)
    unet.train()
    text_encoder.train()
    generator = torch.Generator().manual_seed(seed)
    n = data.mean.shape[0]

    def checkpoint(step: int) -> Path:
        state.update(unet_steps_done=step, minutes=(time.monotonic() - t0) / 60)
        snapshot = dict(components, unet=ema.shadow[0], text_encoder=ema.shadow[1])
        return save_checkpoint(snapshot, out, f"checkpoint-{step:06d}", state)

    start = last_save = time.monotonic()
    bar = tqdm(range(config.unet_steps), desc="unet", disable=not progress, mininterval=10)
    running = 0.0
    step = 0
    for step in bar:
        if config.unet_minutes is not None and time.monotonic() - start > 60 * config.unet_minutes:
            break
        idx = torch.randint(0, n, (config.batch,), generator=generator)
        eps = torch.randn(data.mean[idx].shape, generator=generator)
        latents = (data.mean[idx] + data.std[idx] * eps) * scale
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (config.batch,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, t)
        ids = data.input_ids[idx].clone()
        drop = torch.rand(config.batch, generator=generator) < config.caption_dropout
        ids[drop] = data.empty_ids
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        target = training_target(noise_scheduler, latents, noise, t)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        for group in optimiser.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config.warmup)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        ema.update(step)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            _log(out, {"stage": "unet", "step": step, "loss": running, "t": time.monotonic() - t0})
        if time.monotonic() - last_save > 60 * config.checkpoint_minutes:
            checkpoint(step + 1)
            last_save = time.monotonic()
    else:
        step = config.unet_steps
    return checkpoint(step)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    config = CONFIGS[args.config]
    if args.vae_minutes is not None:
        config = replace(config, vae_minutes=args.vae_minutes)
    if args.unet_minutes is not None:
        config = replace(config, unet_minutes=args.unet_minutes)
    # A step count replaces the stage's time cap, so that a run can be repeated exactly.
    if args.vae_steps is not None:
        config = replace(config, vae_steps=args.vae_steps, vae_minutes=args.vae_minutes)
    if args.unet_steps is not None:
        config = replace(config, unet_steps=args.unet_steps, unet_minutes=args.unet_minutes)
    final = train(config, args.out, seed=args.seed, progress=not args.no_progress)
    print(f"final checkpoint: {final}", file=sys.stderr)


if __name__ == "__main__":
    main()
