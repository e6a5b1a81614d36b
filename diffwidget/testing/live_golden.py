"""Golden values for the JavaScript runtime's unit tests, written by the Python originals.

``python -m diffwidget.testing.live_golden`` writes ``js/test/fixtures/live_golden.json``:
tokenizations by the embedded model's own ``CLIPTokenizer`` (with the caption normaliser and
the unknown-word check), ``torch.randn`` with a seeded CPU generator, and diffusers'
``DPMSolverMultistepScheduler`` built from the shipped config (timesteps, sigmas, and the
samples of a whole run fed with fixed model outputs), and the same for the DiT's
``FlowMatchEulerDiscreteScheduler`` (as shipped, and with SD3's resolution shift of 3) with
each step's x̂0 from :func:`diffwidget.tracing.noise.predict_x0`.
``tests/models/test_live_golden.py`` fails when the committed file differs from what this
writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget._generated import write_or_check

FIXTURE = Path(__file__).resolve().parents[2] / "js" / "test" / "fixtures" / "live_golden.json"
#: Captions covering the normaliser, the grammar, unknown words, digits and truncation.
CAPTIONS: tuple[str, ...] = (
    "a large red circle on the left",
    "A Red circle, in the CENTER!",
    "a small blue square above a yellow triangle",
    "  a\tgreen   triangle at the top  ",
    "",
    "a cat sitting on a sofa",
    "3 red circles",
    "a red circle left of a blue square left of a green triangle left of a red circle",
    "a centered circle in the center",
    "café au lait",
    "don't stop",
)
#: (seed, number of values) pairs for torch.randn: below, at and above the 16-value block.
NOISE_CASES: tuple[tuple[int, int], ...] = (
    (0, 1),
    (0, 5),
    (3, 15),
    (0, 16),
    (1, 17),
    (42, 33),
    (2**32 + 5, 20),
    (0, 1024),
    (12345, 1024),
)
SCHEDULE_STEPS: tuple[int, ...] = (1, 2, 4, 10, 14, 15, 20, 25, 50)
#: Size of the fake sample the scheduler runs are stepped on.
RUN_SIZE = 8
_DIGITS = 9


def _round(values: Any) -> list[float]:
    return [float(f"{v:.{_DIGITS}g}") for v in np.asarray(values, np.float64).ravel()]


def tokenizer_cases(pipe: Any) -> list[dict[str, Any]]:
    """Each caption's ids, token strings and kinds, selected positions and unknown words."""
    import warnings

    from diffwidget.models.prompts import check_prompt, unknown_words
    from diffwidget.models.tokenizer import normalise_caption
    from diffwidget.tracing.tokens import prompt_tokens

    cases = []
    for caption in CAPTIONS:
        tokens = prompt_tokens(pipe.tokenizer, caption)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_prompt(caption)
        cases.append(
            {
                "text": caption,
                "normalised": normalise_caption(caption),
                "ids": tokens.ids,
                "strings": tokens.strings,
                "kinds": list(tokens.kinds),
                "selected": tokens.select("default"),
                "unknown": unknown_words(caption),
                "warning": str(caught[0].message) if caught else "",
            }
        )
    return cases


def noise_cases() -> list[dict[str, Any]]:
    """``torch.randn(n, generator=torch.Generator().manual_seed(seed))`` values."""
    import torch

    out = []
    for seed, n in NOISE_CASES:
        generator = torch.Generator("cpu").manual_seed(seed)
        values = torch.randn(n, generator=generator, dtype=torch.float32).numpy()
        out.append({"seed": seed, "n": n, "values": _round(values)})
    return out


def scheduler_cases(pipe: Any) -> list[dict[str, Any]]:
    """Timesteps and sigmas per step count, and a run stepped with fixed model outputs."""
    import torch

    out = []
    for steps in SCHEDULE_STEPS:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        generator = torch.Generator("cpu").manual_seed(steps)
        sample = torch.randn(RUN_SIZE, generator=generator)
        outputs = torch.randn(steps, RUN_SIZE, generator=generator)
        samples = []
        for i, t in enumerate(scheduler.timesteps):
            sample = scheduler.step(outputs[i], t, sample).prev_sample
            samples.append(_round(sample.numpy()))
        out.append(
            {
                "steps": steps,
                "timesteps": [int(t) for t in scheduler.timesteps],
                "sigmas": _round(scheduler.sigmas.numpy()),
                "start": _round(
                    torch.randn(RUN_SIZE, generator=torch.Generator().manual_seed(steps)).numpy()
                ),
                "model_outputs": [_round(o) for o in outputs.numpy()],
                "samples": samples,
            }
        )
    return out


#: Resolution shifts of the flow-matching runs: the DiT's own (1) and SD3's (3).
FLOW_SHIFTS: tuple[float, ...] = (1.0, 3.0)


def flow_scheduler_cases() -> list[dict[str, Any]]:
    """The DiT's flow-matching Euler runs: timesteps, sigmas, x̂0 and samples per step."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffwidget.models.loader import DIT_DIR
    from diffwidget.tracing.noise import (
        predict_x0,
        prediction_type,
        scheduler_family,
        step_coefficients,
    )

    shipped = FlowMatchEulerDiscreteScheduler.from_pretrained(DIT_DIR, subfolder="scheduler")
    out = []
    for shift in FLOW_SHIFTS:
        for steps in SCHEDULE_STEPS:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(shipped.config, shift=shift)
            scheduler.set_timesteps(steps)
            family, kind = scheduler_family(scheduler), prediction_type(scheduler)
            generator = torch.Generator("cpu").manual_seed(steps)
            sample = torch.randn(RUN_SIZE, generator=generator)
            start = sample.numpy().copy()
            outputs = torch.randn(steps, RUN_SIZE, generator=generator)
            samples, x0s = [], []
            for i, t in enumerate(scheduler.timesteps):
                c = step_coefficients(scheduler, family, float(t), i)
                x0 = predict_x0(
                    sample.numpy(), outputs[i].numpy(), c.alpha, c.sigma, c.input_scale, kind
                )
                x0s.append(_round(x0))
                sample = scheduler.step(outputs[i], t, sample).prev_sample
                samples.append(_round(sample.numpy()))
            out.append(
                {
                    "shift": shift,
                    "steps": steps,
                    "model_timesteps": _round(scheduler.timesteps.numpy()),
                    "sigmas": _round(scheduler.sigmas.numpy()),
                    "start": _round(start),
                    "model_outputs": [_round(o) for o in outputs.numpy()],
                    "x0": x0s,
                    "samples": samples,
                }
            )
    return out


def golden() -> dict[str, Any]:
    """Everything the fixture holds."""
    from diffwidget.models.loader import load_demo_pipeline

    pipe = load_demo_pipeline("unet")
    return {
        "source": "python -m diffwidget.testing.live_golden",
        "tokenizer": tokenizer_cases(pipe),
        "noise": noise_cases(),
        "scheduler": scheduler_cases(pipe),
        "flow_scheduler": flow_scheduler_cases(),
    }


def render(data: dict[str, Any]) -> str:
    """The fixture's text (stable: sorted keys, one line per case)."""
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the fixture (``--check``: compare instead, exit 1 when it differs)."""
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m diffwidget.testing.live_golden"
    return write_or_check(FIXTURE, render(golden()), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
