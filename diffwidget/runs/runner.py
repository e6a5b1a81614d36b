"""Run a prompt set: validate everything, split the items, compute and store each one.

``run`` works unchanged as one process, under ``torchrun`` / ``accelerate launch`` (items
split between processes by accelerate), and with ``shard=`` for job arrays. Every
(prompt id, seed) is one result file written atomically; a rerun skips finished items and
redoes missing, corrupt and failed ones. A failing item is recorded with its error and the
run goes on. Whoever finishes the last item aggregates the run (no collectives needed).
"""

from __future__ import annotations

import errno
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from diffwidget.runs.item_records import (
    ItemError,
    ItemRecord,
    ItemResult,
    ProcessInfo,
    result_fields,
)
from diffwidget.runs.locks import ItemLock
from diffwidget.runs.manifest import RunManifest, Work
from diffwidget.runs.metrics import DEFAULT_METHODS, DEFAULT_METRICS, ItemOutput, compute_item
from diffwidget.runs.prompts import load_prompts
from diffwidget.runs.settings import MethodChoice, Metric, RunSettings, model_fingerprint
from diffwidget.runs.sharding import Processes, Shard, processes
from diffwidget.runs.store import RunSetupError, RunStore, atomic_write, write_json
from diffwidget.tracing.lock import hold_pipeline

if TYPE_CHECKING:
    from diffwidget.explain.faithfulness import InsertionDeletion, InsertionDeletionConfig

#: Called after every item this process finishes: ``on_item(key, status)``.
ItemCallback = Callable[[str, str], None]


@dataclass
class RunReport:
    """What one process did.

    Attributes
    ----------
    out : Path
        The run folder.
    computed, failed, skipped : list of str
        Item keys this process computed successfully, recorded as failed, or found done.
    busy : list of str
        Item keys another live process was computing (left to it).
    first_error : str, optional
        ``"<key>: <type>: <message>"`` of the first item this process recorded as failed.
    summary : Path, optional
        ``summary.md`` when this process aggregated the run.
    no_summary : str, optional
        Why every item is finished yet no summary was written (no item succeeded).
    rank, processes : int
        This process's index and the number of processes.
    """

    out: Path
    computed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    first_error: str | None = None
    summary: Path | None = None
    no_summary: str | None = None
    rank: int = 0
    processes: int = 1


class RunStoppedError(RuntimeError):
    """An I/O error (a full disk, a read-only or failing file system) stopped the run.

    Attributes
    ----------
    report : RunReport
        What the process did before it stopped.
    """

    def __init__(self, message: str, report: RunReport) -> None:
        super().__init__(message)
        self.report = report


#: Errors of the machine rather than of one item: raised while computing, they stop the run.
STOP_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE}
)


def check_settings(settings: RunSettings) -> RunSettings:
    """Validate the settings before any work (:meth:`RunSettings.checked`: every method's
    config complete); errors say how to fix them.

    Raises
    ------
    RunSetupError
        For an unknown method or metric, steps outside the run, bad seeds, a config of a
        method the run does not compute or a setting its config refuses, or a model folder
        that is not a pipeline.
    """
    try:
        return settings.checked()
    except ValueError as error:
        raise RunSetupError(str(error)) from None


#: Packages the aggregation needs (the ``[runs]`` extra): tables, Parquet, plots.
AGGREGATION_PACKAGES = ("pandas", "pyarrow", "matplotlib")


def _check_aggregation_packages() -> None:
    import importlib.util

    missing = [name for name in AGGREGATION_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise RunSetupError(
            f"aggregating a run needs {', '.join(missing)}: pip install 'diffwidget[runs]' "
            "(or pass aggregate=False)"
        )


def _load_pipeline(settings: RunSettings, device: str) -> Any:
    from diffwidget.models.loader import is_demo_model, load_demo_pipeline

    if settings.model is None or is_demo_model(settings.model):
        return load_demo_pipeline(settings.model or "unet", device=device)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(settings.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _error_record(error: Exception) -> ItemError:
    return ItemError(
        type=type(error).__name__,
        message=str(error),
        traceback="".join(traceback.format_exception(error)),
    )


def _new_record(work: Work, procs: Processes, **fields: Any) -> ItemRecord:
    # Who computed it: varies with the launch, never part of the results.
    return work.record(process=ProcessInfo(procs.rank, procs.count), **fields)


def _store_item(
    store: RunStore, work: Work, procs: Processes, output: ItemOutput, save_traces: bool
) -> None:
    """Write the companions first, the result file last (it names their sizes)."""
    arrays_path = store.arrays_path(work.key)
    arrays: dict[str, Any] = output.arrays
    atomic_write(arrays_path, lambda p: np.savez(p, **arrays))
    files = {"arrays": store.file_entry(arrays_path)}
    if save_traces and output.trace is not None:
        trace_path = store.trace_path(work.key)
        atomic_write(trace_path, output.trace.save)
        files["trace"] = store.file_entry(trace_path)
    record = _new_record(work, procs, status="ok", files=files, **result_fields(output.record))
    write_json(store.item_path(work.key), record.to_json())


def run(
    prompts: str | Path | Sequence[str],
    out: str | Path,
    *,
    methods: Sequence[MethodChoice] | None = None,
    steps: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    shard: str | Shard | None = None,
    inference_steps: int = RunSettings.inference_steps,
    guidance: float | None = None,
    model: str | None = None,
    pipe: Any = None,
    faithfulness: InsertionDeletionConfig | InsertionDeletion | None = None,
    metrics: Sequence[str] | None = None,
    save_traces: bool = True,
    scene_metrics: bool | None = None,
    device: str | None = None,
    progress: bool = True,
    aggregate: bool = True,
    on_item: ItemCallback | None = None,
) -> RunReport:
    """Compute maps and metrics for every prompt of a set, one result file per item.

    Parameters
    ----------
    prompts : str, Path or sequence of str
        A prompt source (:func:`~diffwidget.runs.prompts.load_prompts`): ``scene:N``, a
        text file, a ``.jsonl`` file, or a list of captions.
    out : str or Path
        Run folder; an existing run there is resumed (same settings required).
    methods : sequence of str, method configs or method objects, optional
        Maps computed at every explained step: ``"attention"`` or a registered saliency
        method, by name (its default settings), by config (``DFRiseConfig(n_masks=200)``)
        or as a configured object (``DFRise(n_masks=200)``); default ``"attention"``,
        ``"df_rise"`` and ``"df_cam"``.
    steps : sequence of int, optional
        Loop indices explained; default the paper's step 15 of 20, scaled.
    seeds : sequence of int
        Seed offsets: each prompt runs once per offset, with a seed derived from its id.
    shard : "k/N" or Shard, optional
        Only the ``k``-th (0-based) of ``N`` contiguous blocks of items (job arrays).
    inference_steps : int
        Denoising steps per generation.
    guidance : float, optional
        CFG scale (default: the pipeline's recommended scale, 3 on the embedded model).
    model : str, optional
        ``"unet"`` (the default) or ``"dit"`` for an embedded model, or a local diffusers
        pipeline folder.
    pipe : diffusers pipeline, optional
        Use this pipeline object instead of loading one (single-process use).
    faithfulness : InsertionDeletionConfig or InsertionDeletion, optional
        Settings of the insertion/deletion curves (random orders, stage size, ...); default
        its config's defaults.
    metrics : sequence of str, optional
        Default faithfulness, segmentation and roles; ``"probes"`` also records pooled
        activations (one more generation per item) for concept curves across the set;
        ``"commitment"`` switches prompts (:mod:`~diffwidget.runs.commitment`);
        ``"concepts"`` maps each scene caption's words (:mod:`~diffwidget.runs.concept_metric`;
        its words and settings: a ``ConceptMapsConfig`` among ``methods``).
    save_traces : bool
        Keep each item's Trace (``open_run(out).explorer(item_id)`` needs it).
    scene_metrics : bool, optional
        Score scene-world captions against the generated image (default: on for the
        embedded models).
    device : str, optional
        ``"cpu"`` to stay on the CPU where CUDA exists.
    progress : bool
        One tqdm bar per process.
    aggregate : bool
        Write ``summary/`` when this process finds every item finished.
    on_item : callable, optional
        ``on_item(key, status)`` after each item this process finishes.

    Returns
    -------
    RunReport

    Raises
    ------
    PromptSourceError, ValueError, RunSetupError
        Before any work: a bad prompt source, an unknown method or metric, a step outside
        the run, a setting a method's config refuses, a folder that holds another run.
    TypeError
        For a method that is neither a name, a config nor a method object.
    RunStoppedError
        When an I/O error such as a full disk stopped the run (its ``report`` says what was
        done); items that fail for their own reasons are recorded and listed in
        ``RunReport.failed`` instead.

    Examples
    --------
    >>> report = run("scene:4", "my-run", methods=["attention", "df_cam"])  # doctest: +SKIP
    >>> report.summary  # doctest: +SKIP
    PosixPath('my-run/summary/summary.md')
    """
    if aggregate:
        _check_aggregation_packages()
    items = load_prompts(prompts)
    wanted = RunSettings.of(
        methods if methods is not None else DEFAULT_METHODS,
        faithfulness,
        steps=tuple(steps) if steps is not None else None,
        seeds=tuple(seeds),
        inference_steps=inference_steps,
        guidance=guidance,
        model=model,
        metrics=cast(
            "tuple[Metric, ...]", tuple(metrics) if metrics is not None else DEFAULT_METRICS
        ),
        save_traces=save_traces,
        scene_metrics=_draws_scenes(model) if scene_metrics is None else scene_metrics,
    )
    settings = check_settings(wanted)
    try:
        chosen_shard = Shard.parse(shard) if isinstance(shard, str) else shard or Shard(0, 1)
    except ValueError as error:
        raise RunSetupError(str(error)) from None
    settings = settings.replace(
        model=settings.model
        if pipe is None or model is not None
        else f"<{type(pipe).__name__} passed in>",
        model_fingerprint=model_fingerprint(model, pipe),
    )
    store = RunStore(out)
    procs = processes(device)
    try:
        with procs.main_first():
            manifest = store.open_manifest(settings, items)
    except OSError as error:
        raise RunSetupError(f"cannot write the run manifest in {store.root}: {error}") from None
    report = RunReport(Path(store.root), rank=procs.rank, processes=procs.count)
    work = manifest.work()
    mine = procs.split(chosen_shard.select(work))
    _compute(store, mine, manifest, pipe, procs, report, progress, on_item)
    if aggregate:
        _aggregate_when_finished(store, work, report)
    return report


def _draws_scenes(model: str | None) -> bool:
    """Whether ``model`` draws the scene world (the embedded UNet and DiT do)."""
    from diffwidget.models.loader import DEMO_MODELS

    return model is None or model in DEMO_MODELS


def _aggregate_when_finished(store: RunStore, work: list[Work], report: RunReport) -> None:
    """Write ``summary/`` when every item is finished and at least one succeeded."""
    statuses = [store.status(unit) for unit in work]
    if not all(status in ("ok", "failed") for status in statuses):
        return
    if "ok" not in statuses:
        report.no_summary = (
            f"no summary written: all {len(work)} items failed (see items/*.json for each error)"
        )
        return
    from diffwidget.runs.report import aggregate as write_aggregate

    try:
        report.summary = write_aggregate(store.root)
    except OSError as error:
        raise _stop(report, f"writing {store.summary_dir}", error) from error


def _compute(
    store: RunStore,
    mine: list[Work],
    manifest: RunManifest,
    pipe: Any,
    procs: Processes,
    report: RunReport,
    progress: bool,
    on_item: ItemCallback | None,
) -> None:
    from tqdm.auto import tqdm

    pending = [w for w in mine if store.status(w) != "ok"]
    todo = {w.key for w in pending}
    report.skipped = [w.key for w in mine if w.key not in todo]
    if not pending:
        return
    if pipe is None:
        pipe = _load_pipeline(manifest.settings, procs.device)
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(pending),
        desc=f"process {procs.rank}/{procs.count}",
        position=procs.rank,
        unit="item",
        disable=not progress,
    )
    with bar:
        for work in pending:
            with store.lock(work.key) as lock:
                if not lock.taken:
                    report.busy.append(work.key)
                    status = "busy"
                elif store.status(work) == "ok":  # finished by another process meanwhile
                    report.skipped.append(work.key)
                    status = "ok"
                else:
                    status = _compute_one(store, work, manifest.settings, pipe, procs, report, lock)
            bar.update()
            if on_item is not None and status in ("ok", "failed"):
                on_item(work.key, status)


def _stop(report: RunReport, doing: str, error: OSError) -> RunStoppedError:
    done = len(report.computed) + len(report.failed)
    return RunStoppedError(
        f"the run stopped: {doing} failed with {error}. {done} items were finished by this "
        "process before; fix the cause (free disk space, a writable folder) and rerun the same "
        "command to resume",
        report,
    )


def _compute_one(
    store: RunStore,
    work: Work,
    settings: RunSettings,
    pipe: Any,
    procs: Processes,
    report: RunReport,
    lock: ItemLock,
) -> str:
    """Compute and store one item under its lock; ``"ok"``, ``"failed"`` or ``"busy"``."""
    key = work.key
    try:
        store.remove_stale_temporaries(key)
    except OSError as error:
        raise _stop(report, f"cleaning {store.root}", error) from error
    scene_metrics = bool(settings.scene_metrics)
    try:
        # The trace and the maps of one item never interleave with other work on this
        # pipeline (an explorer's DF-RISE in the same notebook).
        with hold_pipeline(pipe, f"run item {key}"):
            output = compute_item(pipe, work.item, work.seed, settings, scene_metrics=scene_metrics)
        if not isinstance(output.record, ItemResult):
            raise TypeError(f"compute_item returned {type(output.record).__name__} records")
    except Exception as error:  # recorded, and the run goes on
        if isinstance(error, OSError) and error.errno in STOP_ERRNOS:
            raise _stop(report, f"computing item {key}", error) from error
        if not lock.owned():  # taken over while this process was stalled
            report.busy.append(key)
            return "busy"
        record = _new_record(work, procs, status="failed", error=_error_record(error))
        try:
            write_json(store.item_path(key), record.to_json())
        except OSError as write_error:
            raise _stop(report, f"writing {store.item_path(key)}", write_error) from write_error
        report.failed.append(key)
        if report.first_error is None:
            report.first_error = f"{key}: {record.error}"
        return "failed"
    if not lock.owned():
        report.busy.append(key)
        return "busy"
    try:
        _store_item(store, work, procs, output, settings.save_traces)
    except OSError as error:
        raise _stop(report, f"writing the files of item {key} in {store.root}", error) from error
    report.computed.append(key)
    return "ok"


__all__ = ["RunReport", "RunSetupError", "RunStoppedError", "check_settings", "run"]
