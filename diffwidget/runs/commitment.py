"""The ``commitment`` metric of a run: when does the model decide each attribute of a caption?

Per item (one scene caption, one seed): the caption's trace is switched, at every switch step
``k``, to each of its swapped twins (one attribute of one object changed,
:func:`~diffwidget.models.scene_pairs.swap_pairs`) with
:class:`~diffwidget.explain.prompt_switch.PromptSwitch`, all twins in one batched branch run;
the scene world's exact reader judges every final image. The item stores one
:class:`~diffwidget.runs.item_records.SwitchEntry` per judged attribute and two metrics per
attribute: the share of switch steps whose image keeps A's value (the area under its
commitment curve) and the first switch step from which every later one keeps it.

Across the run, the items of one prompt (its seeds) make one unit: its commitment curve per
attribute is the share of seeds keeping A's value. The summary
(:func:`~diffwidget.explain.commitment_summary.summarise_commitment`) averages the units'
curves per attribute with 95 % bootstrap bands over prompts and gives the step at which each
mean curve crosses 0.9, with its interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget._markup import markdown_text
from diffwidget.explain.commitment_summary import CommitmentSummary, summarise_commitment
from diffwidget.explain.intervals import first_crossing
from diffwidget.explain.intervention_results import COMMITTED_LEVEL, CommitmentCurves
from diffwidget.runs.item_records import SwitchEntry
from diffwidget.runs.metric_names import METRIC_METHODS
from diffwidget.runs.prompts import PromptItem

if TYPE_CHECKING:
    from diffwidget.runs.settings import RunSettings
    from diffwidget.runs.store import RunItem
    from diffwidget.tracing.trace import Trace

#: The intervention a run's ``commitment`` metric uses (its config sits in the run settings).
COMMITMENT_METHOD = METRIC_METHODS["commitment"]
#: Where the aggregated curves are written, inside the run's ``summary/``.
SUMMARY_FILE = "commitment.npz"


def item_commitment(
    pipe: Any, trace: Trace, item: PromptItem, settings: RunSettings
) -> tuple[tuple[SwitchEntry, ...], dict[str, float]]:
    """Switch ``trace`` to each swapped twin of its caption at every switch step.

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline of the run (draws the scene world: the judges read its images).
    trace : Trace
        The item's trace.
    item : PromptItem
        The item (a scene-world caption).
    settings : RunSettings
        The run's settings; their ``prompt_switch`` config is used (the final images are
        never kept in a run).

    Returns
    -------
    tuple of SwitchEntry, and dict of str to float
        The entries, and ``commit.<attribute>.keep_a`` and ``commit.<attribute>.step``
        (NaN when the image never settles on A's value).

    Examples
    --------
    >>> entries, metrics = item_commitment(pipe, trace, item, settings)  # doctest: +SKIP
    >>> sorted(metrics)[:2]  # doctest: +SKIP
    ['commit.colour.keep_a', 'commit.colour.step']
    """
    from diffwidget.explain.prompt_switch import PromptSwitch, PromptSwitchConfig
    from diffwidget.models.scene_pairs import swap_pairs

    config = settings.config(COMMITMENT_METHOD)
    if not isinstance(config, PromptSwitchConfig):  # pragma: no cover - registry guard
        raise TypeError(f"{COMMITMENT_METHOD} is configured by a {type(config).__name__}")
    pairs = swap_pairs(item.prompt)
    switch = PromptSwitch(config.replace(keep_images=False), progress_bar=False)
    results = switch.run_many(pipe, trace, [(p.caption_b, None) for p in pairs])
    entries = tuple(entry for curves in results for entry in switch_entries(curves))
    metrics: dict[str, float] = {}
    for entry in entries:
        keeps = np.asarray(entry.outcomes) == 0
        index = first_crossing(keeps.astype(np.float64), COMMITTED_LEVEL)
        metrics[f"commit.{entry.attribute}.keep_a"] = float(keeps.mean())
        metrics[f"commit.{entry.attribute}.step"] = (
            float("nan") if index is None else float(entry.switch_steps[index])
        )
    return entries, metrics


def switch_entries(curves: CommitmentCurves) -> list[SwitchEntry]:
    """One entry per judged attribute of a one-seed :class:`CommitmentCurves`."""
    if len(curves.seeds) != 1:
        raise ValueError(f"a run item has one seed; these curves have {len(curves.seeds)}")
    return [
        SwitchEntry(
            attribute=attribute,
            a_value=curves.a_values[row],
            b_value=curves.b_values[row],
            prompt_b=curves.prompt_b,
            judge=curves.judges[row],
            exact=curves.exact[row],
            switch_steps=[int(k) for k in curves.switch_steps],
            outcomes=[int(v) for v in curves.outcomes[row, :, 0]],
            image_change=[float(v) for v in curves.image_change[:, 0]],
        )
        for row, attribute in enumerate(curves.attributes)
    ]


def prompt_curves(records: Sequence[RunItem], n_steps: int) -> list[CommitmentCurves]:
    """Per prompt and judged attribute, the commitment curves over the prompt's seeds.

    Items without commitment entries (captions outside the scene world, failed items) are
    left out. Raises ``ValueError`` when the items of a run hold different switch steps.
    """
    units: dict[tuple[str, str, str], list[tuple[int, SwitchEntry]]] = {}
    prompts: dict[str, str] = {}
    for item in records:
        record = item.record
        if record is None or record.status != "ok" or not record.commitment:
            continue
        prompts[record.id] = record.prompt
        for entry in record.commitment:
            key = (record.id, entry.prompt_b, entry.attribute)
            units.setdefault(key, []).append((record.seed, entry))
    curves = []
    for (prompt_id, prompt_b, _), members in units.items():
        members.sort(key=lambda m: m[0])
        first = members[0][1]
        if any(e.switch_steps != first.switch_steps for _, e in members):
            raise ValueError(f"the items of prompt {prompt_id!r} hold different switch steps")
        curves.append(
            CommitmentCurves(
                attributes=[first.attribute],
                a_values=[first.a_value],
                b_values=[first.b_value],
                judges=[first.judge],
                exact=[first.exact],
                seeds=np.array([seed for seed, _ in members], np.int64),
                outcomes=np.array([[e.outcomes for _, e in members]], np.int8).transpose(0, 2, 1),
                image_change=np.array([e.image_change for _, e in members], np.float32).T,
                prompt_a=prompts[prompt_id],
                prompt_b=prompt_b,
                switch_steps=np.asarray(first.switch_steps, np.int64),
                timesteps=np.full(len(first.switch_steps), -1, np.int64),
                n_steps=int(n_steps),
            )
        )
    return curves


def commitment_summary(records: Sequence[RunItem], n_steps: int) -> CommitmentSummary | None:
    """The run's commitment curves per attribute with bootstrap bands over prompts (None
    when no item holds a prompt switch)."""
    curves = prompt_curves(records, n_steps)
    return summarise_commitment(curves) if curves else None


def summary_lines(summary: CommitmentSummary) -> list[str]:
    """The ``summary.md`` section of the commitment metric."""
    last = int(summary.switch_steps[-1])

    def shown(step: int | None, low: float | None, high: float | None) -> str:
        if step is None:
            return "never"
        upper = "never" if high is None or high > last else f"{high:.0f}"
        return f"{step} ({'?' if low is None else f'{low:.0f}'}–{upper})"

    lines = [
        f"## Commitment (prompt switch at every step, level {summary.level:g})",
        "",
        "| attribute | prompts | committed: keeps A ≥ level from "
        "| closed: takes B ≤ 1 − level from |",
        "|---|---|---|---|",
    ]
    for r, attribute in enumerate(summary.attributes):
        committed = shown(summary.committed[r], summary.committed_low[r], summary.committed_high[r])
        closed = shown(summary.closed[r], summary.closed_low[r], summary.closed_high[r])
        name = markdown_text(attribute)
        lines.append(f"| {name} | {summary.n_prompts[r]} | {committed} | {closed} |")
    lines += [
        "",
        f"Switch steps {summary.switch_steps.tolist()} of {summary.n_steps}; intervals: "
        f"{summary.meta.get('band', '')}.",
        "",
    ]
    return lines
