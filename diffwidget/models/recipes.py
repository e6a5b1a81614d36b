"""Settings of the embedded models' training runs (see :mod:`diffwidget.models.train`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

ModelName = Literal["unet", "dit"]
ConfigName = Literal["full", "cpu", "finetune", "smoke"]


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
    unet_steps: int  # steps of stage 2 (the denoiser, UNet or DiT)
    batch: int
    lr: float
    warmup: int
    ema_decay: float
    caption_dropout: float
    checkpoint_minutes: float
    vae_minutes: float | None = None
    unet_minutes: float | None = None


_SMOKE = TrainConfig(
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
)

#: model -> config name -> settings.
CONFIGS: dict[str, dict[str, TrainConfig]] = {
    "unet": {
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
        # Teaches a trained UNet (``--init``) the caption variations, on the CPU.
        "finetune": TrainConfig(
            vae_steps=0,
            vae_batch=8,
            vae_lr=1e-3,
            vae_kl_weight=1e-6,
            n_scenes=8_000,
            unet_steps=2_500,
            batch=32,
            lr=2e-4,
            warmup=100,
            ema_decay=0.999,
            caption_dropout=0.1,
            checkpoint_minutes=10.0,
        ),
        # Proves the recipe runs end to end (used by the tests).
        "smoke": _SMOKE,
    },
    "dit": {},  # filled below from the UNet's settings
}
#: The DiT trains like the UNet, with a longer warm-up (transformers want one) and, on the
#: CPU, twice the time.
CONFIGS["dit"] = {
    "full": replace(CONFIGS["unet"]["full"], warmup=1000),
    "cpu": replace(CONFIGS["unet"]["cpu"], warmup=300, unet_minutes=120.0),
    "smoke": _SMOKE,
}
