"""Training recipe of the shipped preview decoder: distil the embedded VAE into an AutoencoderTiny.

The decoder learns to map latents (in the denoiser's scale, as a trace stores them) to what
the full VAE decodes them to. Its training set mixes the two kinds of latents a preview
sees: encoded scenes of the scene world (clean, on the VAE's manifold) and the predicted
clean latents x̂0 of every step of traced generations (blurry and off-manifold in early
steps). The encoder half is trained to reproduce the VAE encoder's posterior mean in the
same scale, so the folder is a complete ``AutoencoderTiny``. Loss: L1 + MSE in [-1, 1]
image space (decoder) and MSE in latent space (encoder). Everything is seeded.

Command (the shipped weights: 66 minutes on the shared 2-core CPU with one torch thread,
load average about 8, 20 of them building the data set)::

    python -m diffwidget.models.train_preview_decoder --out diffwidget/models/preview/demo

The folder gets ``config.json``, the weights and ``preview.json`` (settings, the VAE's
fingerprint, the held-out PSNR against the full VAE).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget.models.preview_decoder import PROVENANCE_FILE, SHIPPED, vae_fingerprint

#: Layout of the shipped decoder: three stages (16x16 -> 32x32 -> 64x64, the VAE's factor 4)
#: of 16 channels, the full-resolution stage without blocks: the preview of one 64x64 image
#: costs about 1/6 of the embedded VAE's decode on a CPU thread.
TINY_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16),
    "num_encoder_blocks": (1, 1, 1),
    "num_decoder_blocks": (2, 1, 0),
    "latent_channels": 4,
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    # Latents arrive in the denoiser's scale, as for TAESD: no further scaling.
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
#: Pixel values of an 8-bit image, for the PSNR.
PEAK = 255.0


@dataclass(frozen=True)
class PreviewConfig:
    """Hyper-parameters of the distillation."""

    n_scenes: int = 4000
    n_traces: int = 160
    trace_steps: int = 20
    steps: int = 3000
    batch: int = 32
    encoder_every: int = 4
    lr: float = 2e-3
    held_out: int = 256
    seed: int = 0


def _images_to_tensor(images: list[np.ndarray]) -> Any:
    import torch

    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def build_dataset(pipe: Any, config: PreviewConfig) -> tuple[Any, Any, Any]:
    """Latents (denoiser scale), the VAE's decodes of them, and scene images with their latents.

    Returns
    -------
    latents : Tensor (N, C, h, w)
        Encoded scenes and traced x̂0, shuffled.
    targets : Tensor (N, 3, H, W)
        ``pipe.vae`` decodes of ``latents``, in [-1, 1].
    encoder_pairs : tuple of Tensor
        Scene images in [-1, 1] and their posterior means in the denoiser's scale.
    """
    import torch

    from diffwidget.models.scenes import SceneWorld
    from diffwidget.tracing.generate import trace

    vae = pipe.vae
    scaling = float(vae.config.scaling_factor)
    world = SceneWorld(seed=config.seed + 101)
    images = _images_to_tensor([s.image for s in world.sample(config.n_scenes)])
    means, samples = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            posterior = vae.encode(images[start : start + 256]).latent_dist
            means.append(posterior.mean * scaling)
            samples.append(posterior.sample() * scaling)
    mean = torch.cat(means)
    captions = [s.caption for s in world.sample(config.n_traces)]
    x0 = []
    for i, caption in enumerate(captions):
        traced = trace(
            pipe, caption, num_inference_steps=config.trace_steps, seed=config.seed + i,
            decode_previews=False,
        )  # fmt: skip
        x0.append(torch.as_tensor(traced.pred_x0))
    latents = torch.cat([mean, torch.cat(samples), *x0])
    generator = torch.Generator().manual_seed(config.seed)
    latents = latents[torch.randperm(len(latents), generator=generator)]
    targets = []
    with torch.no_grad():
        for start in range(0, len(latents), 256):
            chunk = latents[start : start + 256] / scaling
            targets.append(vae.decode(chunk).sample.clamp(-1, 1))
    return latents, torch.cat(targets), (images, mean)


def psnr(decoded: Any, reference: Any) -> float:
    """PSNR in dB of two [-1, 1] image batches after rounding both to 8 bits."""
    a = ((decoded.clamp(-1, 1) + 1) * 127.5).round()
    b = ((reference.clamp(-1, 1) + 1) * 127.5).round()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(PEAK**2 / mse))


def train(pipe: Any, config: PreviewConfig, out: Path, *, log_every: int = 100) -> dict[str, Any]:
    """Distil ``pipe.vae`` into a new ``AutoencoderTiny`` and save it in ``out``."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(config.seed)
    start = time.monotonic()
    latents, targets, (images, image_latents) = build_dataset(pipe, config)
    data_s = time.monotonic() - start
    n_held = min(config.held_out, len(latents) // 4)
    train_z, held_z = latents[n_held:], latents[:n_held]
    train_y, held_y = targets[n_held:], targets[:n_held]
    model: Any = AutoencoderTiny(**TINY_CONFIG)
    parameters = list(model.decoder.parameters()) + list(model.encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    model.train()
    log: list[dict[str, float]] = []
    for step in range(config.steps):
        pick = torch.randint(0, len(train_z), (config.batch,), generator=generator)
        decoded = model.decode(train_z[pick]).sample
        y = train_y[pick]
        loss = (decoded - y).abs().mean() + (decoded - y).pow(2).mean()
        if step % config.encoder_every == 0:
            # The encoder only completes the folder; it gets a quarter of the updates.
            pick_image = torch.randint(0, len(images), (config.batch,), generator=generator)
            encoded = model.encode(images[pick_image]).latents
            loss = loss + (encoded - image_latents[pick_image]).pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % log_every == 0 or step == config.steps - 1:
            log.append({"step": step, "loss": float(loss)})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    with torch.no_grad():
        held = model.decode(held_z).sample
    record = {
        "config": asdict(config),
        "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()},
        "vae_fingerprint": vae_fingerprint(pipe.vae),
        "held_out_psnr_db": round(psnr(held, held_y), 2),
        "held_out_latents": n_held,
        "decoder_parameters": sum(p.numel() for p in model.decoder.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dataset_minutes": round(data_s / 60, 2),
        "minutes": round((time.monotonic() - start) / 60, 2),
        "final_loss": log[-1]["loss"],
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED["demo"])
    parser.add_argument("--steps", type=int, default=PreviewConfig.steps)
    parser.add_argument("--n-scenes", type=int, default=PreviewConfig.n_scenes)
    parser.add_argument("--n-traces", type=int, default=PreviewConfig.n_traces)
    parser.add_argument("--seed", type=int, default=PreviewConfig.seed)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffwidget.models.loader import load_demo_pipeline

    config = PreviewConfig(
        n_scenes=args.n_scenes, n_traces=args.n_traces, steps=args.steps, seed=args.seed
    )
    record = train(load_demo_pipeline(), config, args.out)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
