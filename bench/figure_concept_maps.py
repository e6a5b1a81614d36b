"""The README's concept-map picture: a word not in the prompt beside the prompt's attention.

The embedded DiT draws ``a red circle on the left`` (seed 0, 20 steps, the trace's defaults)
with concept maps of four words recorded on the way: the prompt's ``red`` and ``circle`` and
two words it does not contain, ``blue`` and ``square`` (the model knows no words outside its
scene world, so the absent words are an absent colour and an absent shape). The panels, all at
loop index 15 (the paper's step 15 of 20): the generated image; the raw attention of the
prompt's ``circle`` token (``AttentionMaps(normalize="none")``: mean over layers and heads,
probability per latent cell); the concept map of ``square`` on its fixed 0-1 scale and
stretched to its own range; the concept map of ``circle`` stretched. Concept maps are the
architecture's default layers (the DiT's first block) at that step, a softmax over the four
words (each cell's shares sum to 1). Usage::

    OMP_NUM_THREADS=1 python bench/figure_concept_maps.py          # writes docs/concept_maps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

CAPTION = "a red circle on the left"
WORDS = ("red", "circle", "blue", "square")
STEP = 15
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "docs" / "concept_maps.png"
_DPI = 80


def maps(model: str = "dit") -> dict[str, Any]:
    """The image and the three maps of the figure (latent grid), with what they are."""
    import torch

    from diffwidget.explain.attention import AttentionMaps
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.models.loader import load_demo_pipeline

    torch.set_num_threads(1)
    pipe = load_demo_pipeline(model)  # type: ignore[arg-type]
    trace, concepts = ConceptMaps(words=WORDS, progress_bar=False).generate(
        pipe, CAPTION, seed=SEED
    )
    attention = AttentionMaps(normalize="none").attribute(trace)
    token = trace.tokens.index("circle")
    per_step = concepts.per_step()[concepts.steps.index(STEP)]
    return {
        "image": trace.image,
        "attention": attention.maps[attention.steps.index(STEP)][token],
        "circle": per_step[concepts.word_index("circle")],
        "square": per_step[concepts.word_index("square")],
        "layers": concepts.default_layers(),
        "shares": {w: float(per_step[i].mean()) for i, w in enumerate(concepts.words)},
    }


def draw(panels: dict[str, Any], out: Path) -> Path:
    """Five panels with titles saying what each one is and on which scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(14, 3.3))
    axes[0].imshow(panels["image"])
    axes[0].set_title(f"generated: '{CAPTION}'", fontsize=9)

    def stretched(key: str) -> tuple[float, float]:
        return float(panels[key].min()), float(panels[key].max())

    shown: list[tuple[str, str, tuple[float, float]]] = [
        (
            "attention",
            f"raw attention of prompt token 'circle'\nstep {STEP} (probability per cell)",
            (0.0, float(panels["attention"].max())),
        ),
        (
            "square",
            "concept map 'square' (NOT in prompt)\nfixed scale 0-1 (share of 4 words)",
            (0, 1),
        ),
        (
            "square",
            "'square' (NOT in prompt), stretched\nto its own range {:.3f}-{:.3f}".format(
                *stretched("square")
            ),
            stretched("square"),
        ),
        (
            "circle",
            "'circle' (in prompt), stretched\nto its own range {:.3f}-{:.3f}".format(
                *stretched("circle")
            ),
            stretched("circle"),
        ),
    ]
    for ax, (key, title, (low, high)) in zip(axes[1:], shown, strict=True):
        image = ax.imshow(panels[key], cmap="magma", vmin=low, vmax=high)
        ax.set_title(title, fontsize=8.5)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Embedded DiT, seed {SEED}, step {STEP} of 20: concept maps of {', '.join(WORDS)} "
        "(softmax over these words; first block, the DiT's default) beside plain attention",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=_DPI)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    panels = maps()
    path = draw(panels, args.out)
    contrast = {k: round(float(np.ptp(panels[k])), 3) for k in ("circle", "square")}
    print(f"{path} ({path.stat().st_size} bytes); mean share per word {panels['shares']}")
    print(f"max - min of the concept maps: {contrast}; layers {panels['layers']}")


if __name__ == "__main__":
    main()
