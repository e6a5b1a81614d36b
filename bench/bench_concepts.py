"""Concept maps (ConceptAttention) on the scene world: segmentation, absent-word control, cost.

For each embedded model (UNet and DiT) and each split (``scene-train:N``, then the held-out
``scene:N``), every caption is traced once with its concept words recorded on the way
(:meth:`ConceptMaps.generate`: the caption's colour and shape words plus one absent colour and
one absent shape). On the same trace, in the same run:

- concept maps, every candidate aggregation (each single layer and four layer ranges, times
  four step windows, :func:`~diffwidget.runs.concept_study.concept_candidates`);
- the plain attention maps of the prompt's tokens: :class:`AttentionMaps`' default and DAAM's
  aggregation (:func:`~diffwidget.runs.segmentation.daam_heat_maps`).

Each found object's colour and shape map is scored against the object's mask read from the
generated image (mIoU at τ = 0.4, best τ, mAP; paired bootstrap gaps over items). The concept
candidate with the best training mIoU at τ 0.4 (ties: mAP) is chosen, then confirmed on the
held-out split. Cost: CPU seconds of a plain trace and of a trace with the concept tap, back to
back on the first held-out captions. One torch thread.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_concepts.py --train 10 --heldout 10 --json c.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget.runs.concept_study import BASELINES

ALL = "layers 0-1 steps 0-1"
RESULTS = Path(__file__).resolve().parent / "RESULTS_concepts.md"


def score_split(pipe: Any, source: str) -> dict[str, Any]:
    """Trace every caption of ``source`` with its concept words and score every map."""
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.models.reader import SceneReader
    from diffwidget.runs.concept_study import (
        concept_candidates,
        concept_heat_maps,
        concept_words,
        score_with_baselines,
    )
    from diffwidget.runs.prompts import load_prompts

    reader = SceneReader()
    per_item: dict[str, list[Any]] = {}
    kept: list[tuple[Any, Any]] = []
    found = total = 0
    for item in load_prompts(source):
        words = concept_words(item.objects)
        method = ConceptMaps(words=tuple(words.words), progress_bar=False)
        trace, result = method.generate(pipe, item.prompt, seed=item.generator_seed())
        assert trace.image is not None
        size = (int(trace.image.shape[0]), int(trace.image.shape[1]))
        heat = concept_heat_maps(result, concept_candidates(len(result.layers)), size)
        scores = score_with_baselines(trace, item.objects, words.words, heat, reader)
        for name, pairs in scores.pairs.items():
            per_item.setdefault(name, []).append(pairs)
        found += sum(scores.found)
        total += len(scores.found)
        kept.append((words, result))
    return {"per_item": per_item, "results": kept, "found": found, "objects": total}


def summarise(split: dict[str, Any], chosen: str, names: list[str]) -> dict[str, Any]:
    """Scores of ``names`` on one split, paired gaps of ``chosen`` and the absent-word mass."""
    from diffwidget.runs.aggregation import segmentation_summary
    from diffwidget.runs.concept_study import word_mass
    from diffwidget.runs.study import paired_gap

    per_item = split["per_item"]
    out: dict[str, Any] = {"objects_found": f"{split['found']} of {split['objects']}"}
    out["scores"] = {n: _rounded(segmentation_summary(per_item[n])) for n in names}
    for base in BASELINES:
        out[f"gap_vs_{base}_miou_tau"] = _rounded(paired_gap(per_item[chosen], per_item[base]))
        out[f"gap_vs_{base}_map"] = _rounded(paired_gap(per_item[chosen], per_item[base], "map"))
    candidate = candidate_named(chosen, len(split["results"][0][1].layers))
    masses = np.array([word_mass(result, words, candidate) for words, result in split["results"]])
    out["mass_present_absent"] = [round(float(v), 4) for v in masses.mean(axis=0)]
    out["mass_absent_over_present"] = round(float(masses[:, 1].mean() / masses[:, 0].mean()), 3)
    return out


def candidate_named(name: str, n_layers: int) -> Any:
    """The candidate of a model with ``n_layers`` layers called ``name`` (names round)."""
    from diffwidget.runs.concept_study import concept_candidates

    return {c.name: c for c in concept_candidates(n_layers)}[name]


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in values.items()}


def choose(per_item: dict[str, list[Any]]) -> tuple[str, list[tuple[str, float, float]]]:
    """The concept candidate with the best mIoU at τ 0.4 (ties: mAP), and the ranking."""
    from diffwidget.runs.segmentation import summarize_pairs

    rows = []
    for name, pairs in per_item.items():
        if name not in BASELINES:
            s = summarize_pairs([p for item in pairs for p in item])
            rows.append((name, float(s["miou_tau"]), float(s["map"])))
    rows.sort(key=lambda r: (r[1], r[2]), reverse=True)
    return rows[0][0], rows


def overhead(pipe: Any, source: str, n: int) -> dict[str, float]:
    """CPU seconds of a plain trace and of one with the concept tap, back to back."""
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.runs.concept_study import concept_words
    from diffwidget.runs.prompts import load_prompts
    from diffwidget.tracing.generate import trace

    plain, concept = [], []
    for item in load_prompts(source)[:n]:
        seed = item.generator_seed()
        method = ConceptMaps(words=tuple(concept_words(item.objects).words), progress_bar=False)
        start = time.process_time()
        trace(pipe, item.prompt, seed=seed)
        plain.append(time.process_time() - start)
        start = time.process_time()
        method.generate(pipe, item.prompt, seed=seed)
        concept.append(time.process_time() - start)
    return {
        "captions": n,
        "plain_cpu_s": round(float(np.sum(plain)), 2),
        "concept_cpu_s": round(float(np.sum(concept)), 2),
        "overhead": round(float(np.sum(concept) / np.sum(plain) - 1.0), 3),
    }


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Choose on the training split, confirm on the held-out one, time the tap."""
    from diffwidget.models.loader import load_demo_pipeline

    pipe = load_demo_pipeline(model)
    start = time.perf_counter()
    train = score_split(pipe, f"scene-train:{args.train}")
    heldout = score_split(pipe, f"scene:{args.heldout}")
    chosen, ranking = choose(train["per_item"])
    layers = heldout["results"][0][1].layers
    singles = [n for n in heldout["per_item"] if n.endswith("steps 0-1") and n != ALL]
    names = sorted({chosen, ALL, *BASELINES})
    out: dict[str, Any] = {
        "layers": layers,
        "chosen_on_train": chosen,
        "train_top5": [(n, round(a, 4), round(b, 4)) for n, a, b in ranking[:5]],
        "train": summarise(train, chosen, names),
        "heldout": summarise(heldout, chosen, names),
    }
    held_rank = choose(heldout["per_item"])[1]
    out["heldout_by_candidate"] = [
        (n, round(a, 4), round(b, 4)) for n, a, b in held_rank if n in singles or n == ALL
    ]
    out["score_s"] = round(time.perf_counter() - start, 1)
    out["overhead"] = overhead(pipe, f"scene:{args.heldout}", args.overhead_captions)
    return out


def main() -> None:
    import torch
    from benchlib import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "dit"])
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=10)
    parser.add_argument("--overhead-captions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "settings": vars(args) | {"json": None}}
    result["load_before"] = [round(x, 2) for x in os.getloadavg()]
    for model in args.models:
        result[model] = bench_model(model, args)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
