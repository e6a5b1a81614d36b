"""Prompt adherence of the embedded model, scored by the scene reader.

For held-out captions (half of them use (colour, shape, position) combinations never seen in
training), the model generates one image per caption; :class:`SceneReader` reads the objects
back, and each attribute named by the caption is scored:

* one-object captions: the largest object read is compared with the caption (colour, shape,
  size, position), and ``count`` says whether exactly one object was found;
* two-object captions: for each object of the caption, the read object of the same colour
  (and, if several, the one nearest its expected place) is compared for shape, size and
  position; ``colour`` means an object of that colour was found at all; ``scene`` means both
  objects were right in every attribute.

Captions without the size word (``--no-size``: the same held-out scenes, every size left
out) are scored in groups ending in ``no-size``, on colour, shape and position only (the
size is then the model's choice).

Commands (either embedded model, or a training checkpoint of one)::

    python -m diffwidget.models.evaluate --n 200 --no-size
    python -m diffwidget.models.evaluate --model dit --n 200 --no-size
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffwidget.models.reader import ReadObject, SceneReader
from diffwidget.models.scenes import ANCHORS, HELD_OUT_TRIPLES, Scene, SceneWorld, parse_caption

ATTRIBUTES = ("colour", "shape", "size", "position")
EVAL_SEED = 1234
EVAL_BATCH = 16


@dataclass
class AdherenceReport:
    """Per-attribute accuracy, split by object count and by seen/unseen combination."""

    counts: dict[str, dict[str, list[bool]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )

    def add(self, group: str, attribute: str, correct: bool) -> None:
        """Record one scored attribute."""
        self.counts[group][attribute].append(bool(correct))

    def accuracy(self) -> dict[str, dict[str, float]]:
        """group -> attribute -> share correct."""
        return {
            group: {a: float(np.mean(v)) for a, v in attrs.items()}
            for group, attrs in self.counts.items()
        }

    def sizes(self) -> dict[str, int]:
        """group -> number of captions scored."""
        return {group: len(next(iter(attrs.values()))) for group, attrs in self.counts.items()}

    def table(self) -> str:
        """A plain-text table of :meth:`accuracy`."""
        columns = [*ATTRIBUTES, "count", "scene"]
        lines = [f"{'group':<28}{'n':>5}" + "".join(f"{c:>10}" for c in columns)]
        acc, sizes = self.accuracy(), self.sizes()
        for group in sorted(acc):
            cells = [
                f"{100 * acc[group][c]:9.1f}%" if c in acc[group] else f"{'-':>10}" for c in columns
            ]
            lines.append(f"{group:<28}{sizes[group]:>5}" + "".join(cells))
        return "\n".join(lines)


def _distance(obj: ReadObject, position: str) -> float:
    ax, ay = ANCHORS[position]
    return (obj.centre[0] - ax) ** 2 + (obj.centre[1] - ay) ** 2


def score(scene: Scene, found: list[ReadObject], report: AdherenceReport) -> None:
    """Score the objects read from one generated image against its caption's scene.

    A caption without size words is scored on colour, shape and position, in groups whose
    names end in ``no-size``.
    """
    unseen = any((o.colour, o.shape, o.position) in HELD_OUT_TRIPLES for o in scene.objects)
    kind = "one-object" if len(scene.objects) == 1 else "two-object"
    groups = [kind, f"{kind} {'unseen' if unseen else 'seen'}"]
    said = [spec.size is not None for spec in parse_caption(scene.caption)]
    if not any(said):
        groups = [f"{group} no-size" for group in groups]
    if len(scene.objects) == 1:
        truth = scene.objects[0]
        best = found[0] if found else None
        attributes = [a for a in ATTRIBUTES if a != "size" or said[0]]
        for group in groups:
            for a in attributes:
                report.add(group, a, best is not None and getattr(best, a) == getattr(truth, a))
            report.add(group, "count", len(found) == 1)
            report.add(
                group,
                "scene",
                best is not None and all(getattr(best, a) == getattr(truth, a) for a in attributes),
            )
        return
    all_right = len(found) == 2
    results = []
    for truth, size_said in zip(scene.objects, said, strict=True):
        same_colour = [o for o in found if o.colour == truth.colour]
        match = min(same_colour, key=lambda o: _distance(o, truth.position), default=None)
        checks = {"colour": match is not None}
        for a in ("shape", "size", "position") if size_said else ("shape", "position"):
            checks[a] = match is not None and getattr(match, a) == getattr(truth, a)
        all_right = all_right and all(checks.values())
        results.append(checks)
    for group in groups:
        for checks in results:
            for a, ok in checks.items():
                report.add(group, a, ok)
        # Per-object lists have two entries per scene; count and scene are per-object too so
        # that every column of a group has the same denominator.
        for _ in results:
            report.add(group, "count", len(found) == 2)
            report.add(group, "scene", all_right)


def reader_accuracy(n: int = 400, seed: int = EVAL_SEED) -> AdherenceReport:
    """Score the reader on rendered held-out scenes (the ground truth as 'generated' images)."""
    reader = SceneReader()
    report = AdherenceReport()
    for scene in SceneWorld(seed).held_out_scenes(n):
        score(scene, reader.read(scene.image), report)
    return report


def generate(
    pipe: Any,
    captions: list[str],
    *,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = EVAL_BATCH,
) -> np.ndarray:
    """uint8 [n, H, W, 3] images, one per caption, each with its own seeded generator."""
    import torch

    images = []
    for first in range(0, len(captions), batch_size):
        chunk = captions[first : first + batch_size]
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))]
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        images.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(images)


def evaluate(
    pipe: Any,
    n: int = 200,
    *,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = EVAL_SEED,
    size_words: bool = True,
) -> tuple[AdherenceReport, list[Scene], np.ndarray]:
    """Generate for ``n`` held-out captions and score them.

    Parameters
    ----------
    pipe : pipeline
        Either embedded model (or any pipeline taking the same call).
    n : int
        Held-out captions (half of them with unseen combinations).
    steps, guidance_scale : int, float
        Sampling settings.
    seed : int
        Seed of the held-out scenes and of each caption's generator.
    size_words : bool
        False: the same scenes, captions without their size words.

    Returns
    -------
    report, scenes, images
        The adherence report, the reference scenes (captions and ground truth) and the
        generated uint8 images.
    """
    scenes = SceneWorld(seed).held_out_scenes(n, size_words=size_words)
    images = generate(
        pipe, [s.caption for s in scenes], steps=steps, guidance_scale=guidance_scale, seed=seed
    )
    reader = SceneReader()
    report = AdherenceReport()
    for scene, image in zip(scenes, images, strict=True):
        score(scene, reader.read(image), report)
    return report, scenes, images


def sample_grid(images: np.ndarray, captions: list[str], columns: int = 6, scale: int = 3) -> Any:
    """A PIL image: generated samples (upscaled) with their captions underneath."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    rows = (n + columns - 1) // columns
    side = images.shape[1] * scale
    caption_h = 30
    pad = 6
    cell_w = side + 2 * pad
    sheet = Image.new("RGB", (columns * cell_w, rows * (side + caption_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x = (i % columns) * cell_w + pad
        y = (i // columns) * (side + caption_h + pad) + pad
        tile = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        words = caption.split()
        half = (len(words) + 1) // 2 if len(caption) > 30 else len(words)
        for line_no, line in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
            draw.text((x, y + side + 2 + 12 * line_no), line, fill="black", font=font)
    return sheet


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Prompt adherence of the embedded model.")
    parser.add_argument("--model", choices=("unet", "dit"), default="unet")
    parser.add_argument("--n", type=int, default=200, help="held-out captions")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=None, help="default: the model's"
    )
    parser.add_argument("--no-size", action="store_true", help="also score size-less captions")
    parser.add_argument("--path", default=None, help="pipeline folder (default: shipped)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the accuracies to this file")
    parser.add_argument("--grid", default=None, help="write a PNG grid of samples here")
    args = parser.parse_args(argv)
    import torch

    from diffwidget.models.loader import load_demo_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_demo_pipeline(args.model, path=args.path)
    guidances = args.guidance or [pipe.recommended_guidance_scale]
    reader_report = reader_accuracy(seed=args.seed)
    print("reader on rendered held-out scenes (ground truth images):")
    print(reader_report.table())
    results: dict[str, Any] = {
        "reader": reader_report.accuracy(),
        "reader_n": reader_report.sizes(),
    }
    sampler = type(pipe.scheduler).__name__
    for guidance in guidances:
        for size_words in (True, False) if args.no_size else (True,):
            start = time.perf_counter()
            report, scenes, images = evaluate(
                pipe,
                args.n,
                steps=args.steps,
                guidance_scale=guidance,
                seed=args.seed,
                size_words=size_words,
            )
            seconds = time.perf_counter() - start
            what = "held-out captions" if size_words else "held-out captions without sizes"
            print(
                f"\n{args.model}, {args.n} {what}, {args.steps} steps of {sampler}, CFG {guidance}:"
            )
            print(report.table())
            results[f"cfg={guidance}" + ("" if size_words else " no-size")] = {
                "accuracy": report.accuracy(),
                "n": report.sizes(),
                "seconds": seconds,
            }
            if args.grid and guidance == guidances[0] and size_words:
                k = 24
                sample_grid(images[:k], [s.caption for s in scenes[:k]]).save(args.grid)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
