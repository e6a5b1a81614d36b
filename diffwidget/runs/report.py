"""The human-readable part of an aggregated run: PNG plots and ``summary.md``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget._markup import markdown_text
from diffwidget.runs import commitment as commitment_metric
from diffwidget.runs import concept_metric
from diffwidget.runs.aggregation import (
    RANDOM_ORDER,
    ROLES_CURVE,
    SEGMENTATION_CURVE,
    aggregate_curves,
    concept_curves,
    faithfulness_table,
    item_table,
    load_records,
    metric_table,
    segmentation_table,
)
from diffwidget.runs.segmentation import DAAM_TAU
from diffwidget.runs.store import RunStore, atomic_write

if TYPE_CHECKING:
    import pandas as pd

    from diffwidget.explain.commitment_summary import CommitmentSummary
    from diffwidget.runs.concept_metric import ConceptSummary
    from diffwidget.runs.manifest import RunManifest

#: Rows of the "worst items" list in summary.md.
WORST_ITEMS = 5
_DPI = 110


def _panel(ax: Any, curve: dict[str, Any], title: str) -> None:
    """Mean lines with ± sd bands; the random-order baseline dashed."""
    for line in curve["lines"]:
        dashed = line["label"] == RANDOM_ORDER
        (drawn,) = ax.plot(
            curve["x"],
            line["mean"],
            linestyle="--" if dashed else "-",
            label=f"{line['label']} (n={line['n']})",
        )
        ax.fill_between(
            curve["x"],
            line["mean"] - line["sd"],
            line["mean"] + line["sd"],
            color=drawn.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(curve["xlabel"])
    ax.set_ylabel(curve["ylabel"])
    ax.legend(fontsize=7)


def write_plots(folder: Path, curves: dict[str, dict[str, Any]], probes: Any) -> list[str]:
    """Write the PNG plots of :func:`~diffwidget.runs.aggregation.aggregate_curves` (and of the
    concept curves); returns their file names."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        atomic_write(folder / name, lambda p: fig.savefig(p, dpi=_DPI, format="png"))
        plt.close(fig)
        written.append(name)

    maps = sorted({n.rsplit(" ", 1)[0] for n in curves if n.endswith((" deletion", " insertion"))})
    if maps:
        fig, axes = plt.subplots(2, len(maps), figsize=(3.6 * len(maps), 6), squeeze=False)
        for col, name in enumerate(maps):
            for row, kind in enumerate(("deletion", "insertion")):
                _panel(axes[row, col], curves[f"{name} {kind}"], f"{name} {kind}")
        fig.suptitle("Insertion / deletion: mean ± sd over items", fontsize=10)
        save(fig, "faithfulness.png")
    for key, name in ((SEGMENTATION_CURVE, "segmentation.png"), (ROLES_CURVE, "roles.png")):
        if key in curves:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            _panel(ax, curves[key], f"{key}: mean ± sd")
            if key == SEGMENTATION_CURVE:
                ax.axvline(DAAM_TAU, color="grey", linestyle=":")
            save(fig, name)
    if probes is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k, concept in enumerate(probes.concepts):
            (line,) = ax.plot(probes.steps, probes.curves[k], label=concept)
            ax.fill_between(
                probes.steps,
                probes.band_low[k],
                probes.band_high[k],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        ax.axhline(0.5, color="grey", linestyle=":", label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out ROC-AUC (unconditional half)")
        ax.legend(fontsize=8)
        save(fig, "concepts.png")
    return written


#: Columns holding counts, printed without decimals.
_COUNT_COLUMNS = frozenset({"n", "n_pairs", "n_items"})


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return markdown_text(value)
    return "–" if not np.isfinite(number) else f"{number:.{digits}f}"


def _markdown(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [_fmt(row[c], 0 if c in _COUNT_COLUMNS else 3) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def worst_metric(table: pd.DataFrame) -> str | None:
    """The column whose lowest values mark the worst items.

    Segmentation IoU of our aggregation when present, else the first map's deletion gain
    (random minus map AUC); low is bad for both.

    Examples
    --------
    >>> import pandas as pd
    >>> worst_metric(pd.DataFrame({"df_cam@15.deletion_gain": [0.1]}))
    'df_cam@15.deletion_gain'
    """
    for column in table.columns:
        if column.startswith("seg.ours.iou@"):
            return str(column)
    gains = [c for c in table.columns if c.endswith(".deletion_gain")]
    return str(gains[0]) if gains else None


def write_summary(
    folder: Path,
    manifest: RunManifest,
    table: pd.DataFrame,
    metrics: pd.DataFrame,
    faith: pd.DataFrame,
    seg: pd.DataFrame,
    curves: dict[str, dict[str, Any]],
    probes: Any,
    figures: list[str],
    commitment: CommitmentSummary | None = None,
    concepts: ConceptSummary | None = None,
) -> Path:
    """Write ``summary.md`` and return its path."""
    lines = _header_lines(manifest, table)
    lines += _faithfulness_lines(faith)
    lines += _segmentation_lines(seg)
    lines += _role_lines(curves)
    lines += _probe_lines(probes)
    if commitment is not None:
        lines += commitment_metric.summary_lines(commitment)
    if concepts is not None:
        lines += concept_metric.summary_lines(concepts)
    lines += ["## Every metric (mean ± sd over items, 95 % bootstrap interval of the mean)", ""]
    lines += _markdown(metrics, ["metric", "n", "mean", "sd", "ci_low", "ci_high"])
    lines += _worst_lines(table)
    lines += _failed_lines(table)
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in figures]
    text = "\n".join(lines) + "\n"
    return atomic_write(folder / "summary.md", lambda p: p.write_text(text, encoding="utf-8"))


#: Columns of the faithfulness table shown in summary.md.
_FAITHFULNESS_COLUMNS = (
    "map",
    "n",
    "saliency_deletion_mean",
    "random_deletion_mean",
    "deletion_beats_random",
    "saliency_insertion_mean",
    "random_insertion_mean",
    "insertion_beats_random",
    "paper_saliency_deletion_auc",
    "paper_random_deletion_auc",
)
#: Columns of the segmentation table shown in summary.md.
_SEGMENTATION_COLUMNS = (
    "aggregation",
    "miou_tau",
    "miou_tau_ci_low",
    "miou_tau_ci_high",
    "best_tau",
    "miou_best",
    "map",
    "n_pairs",
    "n_items",
    "objects_found",
)


def _header_lines(manifest: RunManifest, table: pd.DataFrame) -> list[str]:
    """Title, item counts by status, and every setting of the run."""
    settings = manifest.settings.named()
    counts = table["status"].value_counts().to_dict()
    return [
        "# Run summary",
        "",
        f"{len(table)} items: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
        "",
        "Settings: " + "; ".join(markdown_text(f"{k} = {v}") for k, v in settings.items()) + ".",
        "",
    ]


def _faithfulness_lines(faith: pd.DataFrame) -> list[str]:
    if not len(faith):
        return []
    lines = ["## Faithfulness (insertion / deletion AUC, map beside random order)", ""]
    lines += _markdown(faith, _FAITHFULNESS_COLUMNS)
    return [
        *lines,
        "",
        "Lower deletion and higher insertion than random mean a faithful map; `paper_*` "
        "is the paper's aggregation (mean curve, min-max, trapezoid).",
        "",
    ]


def _segmentation_lines(seg: pd.DataFrame) -> list[str]:
    if not len(seg):
        return []
    lines = [f"## Segmentation against the generated image's objects (τ = {DAAM_TAU})", ""]
    lines += _markdown(seg, _SEGMENTATION_COLUMNS)
    return [
        *lines,
        "",
        "`ours` is `AttentionMaps()` with its defaults, `daam` DAAM's sum over layers, "
        "heads and steps; pairs are each object's colour and shape word.",
        "",
    ]


def _role_lines(curves: dict[str, dict[str, Any]]) -> list[str]:
    if ROLES_CURVE not in curves:
        return []
    lines = ["## Token roles (attention mass, mean over items per step)", ""]
    for line in curves[ROLES_CURVE]["lines"]:
        values = ", ".join(_fmt(v, 3) for v in line["mean"])
        lines.append(f"- {markdown_text(line['label'])} (n = {line['n']}): {values}")
    return [*lines, ""]


def _probe_lines(probes: Any) -> list[str]:
    if probes is None:
        return []
    first = probes.first_step_above()
    lines = ["## Concept probes (unconditional half, held-out ROC-AUC)", ""]
    lines += [
        f"- {markdown_text(c)}: first step sustained ≥ 0.9: {first[c]}" for c in probes.concepts
    ]
    return [*lines, ""]


def _worst_lines(table: pd.DataFrame) -> list[str]:
    """The finished items lowest on :func:`worst_metric`, when the table has one."""
    column = worst_metric(table)
    if column is None:
        return []
    worst = table[table["status"] == "ok"].sort_values(column).head(WORST_ITEMS)
    lines = ["", f"## Worst items by {markdown_text(column)}", ""]
    return lines + _markdown(worst, ["key", "prompt", column])


def _failed_lines(table: pd.DataFrame) -> list[str]:
    failed = table[table["status"] == "failed"]
    if not len(failed):
        return []
    lines = ["", "## Failed items", ""]
    return lines + [
        f"- {markdown_text(row.key)}: {markdown_text(row.error)}" for row in failed.itertuples()
    ]


def _write_table(table: pd.DataFrame, folder: Path, stem: str, parquet: bool = True) -> None:
    atomic_write(folder / f"{stem}.csv", lambda p: table.to_csv(p, index=False))
    if parquet:
        atomic_write(folder / f"{stem}.parquet", lambda p: table.to_parquet(p, index=False))


def aggregate(run_dir: str | Path, *, plots: bool = True) -> Path:
    """Write the tables, plots and ``summary.md`` of a run (finished or not).

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    plots : bool
        Also write the PNG plots (needs matplotlib).

    Returns
    -------
    Path
        The ``summary.md`` written.

    Examples
    --------
    >>> aggregate("my-run")  # doctest: +SKIP
    PosixPath('my-run/summary/summary.md')
    """
    store = RunStore(run_dir)
    manifest, records = load_records(store)
    folder = store.summary_dir
    folder.mkdir(parents=True, exist_ok=True)
    table = item_table(records)
    _write_table(table, folder, "items")
    metrics = metric_table(table)
    _write_table(metrics, folder, "metrics")
    faith = faithfulness_table(records)
    _write_table(faith, folder, "faithfulness", parquet=False)
    seg = segmentation_table(records)
    _write_table(seg, folder, "segmentation", parquet=False)
    curves = aggregate_curves(records)
    probes = concept_curves(store, records) if "probes" in manifest.settings.metrics else None
    if probes is not None:
        probes.save(folder / "concept_curves.json")
    commitment = None
    if "commitment" in manifest.settings.metrics:
        commitment = commitment_metric.commitment_summary(
            records, manifest.settings.inference_steps
        )
        if commitment is not None:
            atomic_write(folder / commitment_metric.SUMMARY_FILE, commitment.save)
    concepts = None
    if "concepts" in manifest.settings.metrics:
        concepts = concept_metric.summarise_concepts(records)
        if concepts is not None:
            atomic_write(folder / concept_metric.SUMMARY_FILE, concepts.save)
    figures = write_plots(folder, curves, probes) if plots else []
    return write_summary(
        folder, manifest, table, metrics, faith, seg, curves, probes, figures, commitment, concepts
    )
