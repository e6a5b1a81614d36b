"""Concept probes on synthetic activations whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffwidget.explain.probes import ConceptCurves, ConceptProbe, macro_auc

N_PROMPTS = 200
N_STEPS = 10
N_FEATURES = 16
ONSET = 4  # the concept becomes separable at this step
SHIFT = 3.0  # class mean offset in noise standard deviations: AUC close to 1
#: Sampling spread of a held-out AUC at chance with 40 test prompts is about 0.05;
#: the fold mean of five is tighter, so 0.15 leaves a wide margin.
CHANCE_TOLERANCE = 0.15


def _synthetic(n_classes: int, onset: int = ONSET, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian activations; from ``onset`` on, class c shifts feature c by ``SHIFT``."""
    rng = np.random.default_rng(seed)
    y = np.arange(N_PROMPTS) % n_classes
    rng.shuffle(y)
    x = rng.normal(size=(N_PROMPTS, N_STEPS, N_FEATURES))
    for c in range(n_classes):
        x[y == c, onset:, c] += SHIFT
    return x.astype(np.float32), y


def test_binary_curve_crosses_at_the_onset_and_is_chance_before() -> None:
    x, y = _synthetic(2)
    curves = ConceptProbe(cv=5, seed=0).fit(x, {"dog": np.where(y == 1, "dog", "no dog")})
    curve = curves.curve("dog")
    assert curves.curves.shape == (1, N_STEPS)
    assert np.all(np.abs(curve[:ONSET] - 0.5) < CHANCE_TOLERANCE), curve
    assert np.all(curve[ONSET:] >= 0.9), curve
    assert curves.first_step_above(0.9) == {"dog": ONSET}
    assert curves.classes["dog"] == ["dog", "no dog"]
    assert curves.fold_scores is not None
    assert curves.fold_scores.shape == (1, N_STEPS, 5)
    assert np.all(curves.band_low <= curves.curves + 1e-6)
    assert np.all(curves.band_high >= curves.curves - 1e-6)


def test_multiclass_macro_auc_curve() -> None:
    x, y = _synthetic(3, onset=6)
    names = np.array(["red", "green", "blue"])[y]
    curves = ConceptProbe(cv=4, seed=1, band="minmax").fit(x, {"colour": names})
    curve = curves.curve("colour")
    assert np.all(np.abs(curve[:6] - 0.5) < CHANCE_TOLERANCE), curve
    assert np.all(curve[6:] >= 0.9), curve
    assert curves.classes["colour"] == ["blue", "green", "red"]
    assert curves.fold_scores is not None
    np.testing.assert_allclose(curves.band_low, curves.fold_scores.min(-1))
    assert "min-max" in curves.meta["band"]


def test_macro_auc_by_hand_and_against_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y]
    assert macro_auc(y, perfect, 3) == pytest.approx(1.0)
    flipped = perfect.copy()
    flipped[:, 2] = 1 - flipped[:, 2]  # class 2's scores reversed: its AUC is 0
    assert macro_auc(y, flipped, 3) == pytest.approx(2 / 3)
    proba = np.random.default_rng(0).dirichlet(np.ones(3), size=6)
    expected = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert macro_auc(y, proba, 3) == pytest.approx(expected)


def test_two_concepts_decodable_in_order() -> None:
    early, y_early = _synthetic(2, onset=2, seed=3)
    late, y_late = _synthetic(2, onset=7, seed=4)
    x = np.concatenate([early, late], axis=-1)
    curves = ConceptProbe().fit(x, {"late": y_late, "early": y_early}, timesteps=range(N_STEPS))
    assert curves.first_step_above(0.9) == {"late": 7, "early": 2}
    assert curves.order(0.9) == ["early", "late"]
    np.testing.assert_array_equal(curves.timesteps, np.arange(N_STEPS))


def test_unlabelled_prompts_are_left_out() -> None:
    x, y = _synthetic(2)
    labels: list[str | None] = ["a" if v else "b" for v in y]
    labels[:20] = [None] * 20
    curves = ConceptProbe().fit(x, {"c": labels})
    assert curves.n_examples == {"c": N_PROMPTS - 20}


def test_any_sklearn_classifier() -> None:
    from sklearn.svm import LinearSVC

    x, y = _synthetic(3)
    curves = ConceptProbe(LinearSVC(), cv=3).fit(x, {"c": y})  # decision_function only
    assert curves.first_step_above(0.9) == {"c": ONSET}
    assert "LinearSVC" in curves.meta["classifier"]


def test_deterministic_under_a_seed() -> None:
    x, y = _synthetic(2)
    a = ConceptProbe(seed=7).fit(x, {"c": y})
    b = ConceptProbe(seed=7).fit(x, {"c": y})
    np.testing.assert_array_equal(a.fold_scores, b.fold_scores)


def test_too_few_examples_is_a_clear_error() -> None:
    x, _ = _synthetic(2)
    labels = ["common"] * N_PROMPTS
    labels[:3] = ["rare"] * 3
    with pytest.raises(ValueError, match=r"'rare': 3.*fewer than cv=5"):
        ConceptProbe(cv=5).fit(x, {"thing": labels})
    with pytest.raises(ValueError, match="at least two"):
        ConceptProbe().fit(x, {"thing": ["same"] * N_PROMPTS})
    with pytest.raises(ValueError, match="one label per prompt"):
        ConceptProbe().fit(x, {"thing": ["a", "b"] * 5})
    with pytest.raises(ValueError, match="n_prompts, n_steps, n_features"):
        ConceptProbe().fit(x[:, 0], {"thing": ["a", "b"] * (N_PROMPTS // 2)})


def _hand_curves() -> ConceptCurves:
    curves = np.array(
        [[0.5, 0.95, 0.6, 0.95, 0.97], [0.5, 0.5, 0.5, 0.6, 0.7], [0.92, 0.95, 0.96, 0.97, 0.99]],
        dtype=np.float32,
    )
    return ConceptCurves(
        kind="probe_auc",
        concepts=["shape", "never", "colour"],
        timesteps=np.array([999, 799, 599, 399, 199]),
        curves=curves,
        band_low=curves - 0.05,
        band_high=np.minimum(curves + 0.05, 1),
        chance=np.full(3, 0.5, dtype=np.float32),
        classes={"shape": ["circle", "square"], "never": ["a", "b"], "colour": ["r", "g"]},
        n_examples={"shape": 10, "never": 10, "colour": 10},
        meta={"cv": 5},
    )


def test_first_step_above_sustained_or_not() -> None:
    curves = _hand_curves()
    assert curves.first_step_above(0.9) == {"shape": 3, "never": None, "colour": 0}
    assert curves.first_step_above(0.9, sustained=False) == {"shape": 1, "never": None, "colour": 0}
    assert curves.order(0.9) == ["colour", "shape", "never"]


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    x, y = _synthetic(2)
    curves = ConceptProbe(cv=3).fit(x, {"c": y}, timesteps=np.arange(N_STEPS)[::-1] * 100)
    path = curves.save(tmp_path / f"curves{suffix}")
    loaded = ConceptCurves.load(path)
    assert loaded.kind == curves.kind
    assert loaded.concepts == curves.concepts
    assert loaded.classes == curves.classes
    assert loaded.n_examples == curves.n_examples
    assert loaded.meta == curves.meta
    for name in ("timesteps", "curves", "band_low", "band_high", "chance", "fold_scores"):
        np.testing.assert_allclose(getattr(loaded, name), getattr(curves, name))
    json.dumps(curves.to_dict())  # the widget sends this as a trait


def test_save_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.json or \.npz"):
        _hand_curves().save(tmp_path / "curves.csv")
