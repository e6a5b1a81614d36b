"""The concept-maps benchmark chooses among concept candidates only, by τ 0.4 then AP."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_concepts  # noqa: E402

from diffwidget.runs.concept_study import concept_candidates  # noqa: E402
from diffwidget.runs.segmentation import PairScore  # noqa: E402


def _pairs(iou: float, ap: float) -> list[list[PairScore]]:
    return [[PairScore(0, "colour", "red", [iou] * 21, ap)]]


def test_choose_skips_the_baselines_and_breaks_ties_by_ap() -> None:
    per_item = {
        "attention": _pairs(0.9, 0.9),
        "daam": _pairs(0.8, 0.8),
        "layers 0-1 steps 0-1": _pairs(0.3, 0.4),
        "layers 0-0.5 steps 0-1": _pairs(0.3, 0.6),
        "layers 0.5-1 steps 0-1": _pairs(0.2, 0.9),
    }
    chosen, ranking = bench_concepts.choose(per_item)
    assert chosen == "layers 0-0.5 steps 0-1"
    assert [r[0] for r in ranking][-1] == "layers 0.5-1 steps 0-1"
    assert len(ranking) == 3


def test_a_candidate_name_reads_back_as_the_same_candidate() -> None:
    for candidate in concept_candidates(7):
        assert bench_concepts.candidate_named(candidate.name, 7) == candidate
