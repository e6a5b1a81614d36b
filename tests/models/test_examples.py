"""Every example caption the project shows is one both embedded models draw correctly.

The captions (and seeds) of the README, the command line's help, the docstrings and the
notebooks, generated as they are used there (20 steps, the model's recommended guidance),
read back by the scene reader and scored against what the caption says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffwidget.models.evaluate import AdherenceReport, score
from diffwidget.models.loader import DEFAULT_STEPS, DEMO_DIRS, demo_weights_available
from diffwidget.models.reader import SceneReader
from diffwidget.models.scenes import EXAMPLE_CAPTIONS, SceneWorld

#: (caption, seed) as the project's examples use them.
EXAMPLES: tuple[tuple[str, int], ...] = (
    *((caption, 0) for caption in EXAMPLE_CAPTIONS),  # README, CLI, quickstart, notebook 02/06
    ("a red circle in the middle", 0),  # the CLI's DiT example
    ("a large blue square on the right", 0),  # notebook 03
    ("a large blue circle on the left", 0),  # notebook 05
    ("a small green triangle at the top", 0),  # notebook 05, seeds 0 and 1
    ("a small green triangle at the top", 1),
    ("a small purple square above a large yellow circle", 0),  # notebook 05
    ("a small blue square at the top", 0),  # tracing.activations docstring
)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            model,
            marks=pytest.mark.skipif(
                not demo_weights_available(DEMO_DIRS[model]), reason=f"no shipped {model} weights"
            ),
        )
        for model in DEMO_DIRS
    ],
)
def test_example_captions_are_drawn_correctly(model: str) -> None:
    import diffwidget

    pipe = diffwidget.load_demo_pipeline(model)
    reader = SceneReader()
    wrong = []
    for caption, seed in EXAMPLES:
        image = pipe(
            caption,
            num_inference_steps=DEFAULT_STEPS,
            guidance_scale=pipe.recommended_guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        report = AdherenceReport()
        scene = SceneWorld(seed=0).render_caption(caption)
        score(scene, reader.read(np.round(image * 255).astype(np.uint8)), report)
        accuracy = report.accuracy()
        if any(a["scene"] < 1.0 or a["count"] < 1.0 for a in accuracy.values()):
            wrong.append((caption, seed, accuracy))
    assert not wrong, wrong
