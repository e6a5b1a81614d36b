"""Run a prompt set: validate everything, split the items, compute and store each one.

``run`` works unchanged as one process, under ``torchrun`` / ``accelerate launch`` (items
split between processes by accelerate), and with ``shard=`` for job arrays. Every
(prompt id, seed) is one result file written atomically; a rerun skips finished items and
redoes missing, corrupt and failed ones. A failing item is recorded with its error and the
run goes on. Whoever finishes the last item aggregates the run (no collectives needed).
"""

from __future__ import annotations

import difflib
import errno
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffwidget.runs.locks import ItemLock
from diffwidget.runs.metrics import MAP_METHODS, METRICS, RunSettings, compute_item
from diffwidget.runs.prompts import PromptItem, load_prompts
from diffwidget.runs.sharding import Processes, Shard, processes
from diffwidget.runs.store import (
    FORMAT_VERSION,
    RunSetupError,
    RunStore,
    atomic_write,
    item_key,
    write_json,
)

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


def _choices(kind: str, given: Sequence[str], allowed: Sequence[str]) -> list[str]:
    given = list(given)
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {kind} {name!r}.{hint} Choose from {list(allowed)}")
    if not given:
        raise ValueError(f"choose at least one {kind} from {list(allowed)}")
    return list(dict.fromkeys(given))


def check_settings(settings: RunSettings) -> RunSettings:
    """Validate the settings before any work; errors say how to fix them.

    Raises
    ------
    RunSetupError
        For an unknown method or metric, steps outside the run, bad seeds or counts, or a
        model folder that is not a pipeline.
    """
    try:
        return _check_settings(settings)
    except ValueError as error:
        raise RunSetupError(str(error)) from None


def _check_settings(settings: RunSettings) -> RunSettings:
    settings.methods = _choices("method", settings.methods, MAP_METHODS)
    settings.metrics = _choices("metric", settings.metrics, METRICS) if settings.metrics else []
    if settings.inference_steps < 1:
        raise ValueError(f"inference steps must be at least 1, got {settings.inference_steps}")
    steps = settings.explained_steps
    bad = [s for s in steps if not 0 <= s < settings.inference_steps]
    if bad or not steps:
        raise ValueError(
            f"explained steps {bad or steps} must be loop indices in "
            f"0..{settings.inference_steps - 1} (not scheduler timesteps)"
        )
    settings.steps = sorted(set(steps))
    if not settings.seeds or any(not isinstance(s, int) or s < 0 for s in settings.seeds):
        raise ValueError(f"seeds must be non-negative integers, got {settings.seeds}")
    settings.seeds = list(dict.fromkeys(settings.seeds))
    if settings.rise_masks < 1 or settings.n_random < 1:
        raise ValueError("rise_masks and n_random must be at least 1")
    if settings.cells_per_stage is not None and settings.cells_per_stage < 1:
        raise ValueError(f"cells_per_stage must be at least 1, got {settings.cells_per_stage}")
    if settings.guidance is not None and settings.guidance <= 1:
        raise ValueError(
            f"guidance must be above 1 (classifier-free guidance), got {settings.guidance}"
        )
    from diffwidget.models.loader import DEMO_MODELS

    if (
        settings.model is not None
        and settings.model not in DEMO_MODELS
        and not (Path(settings.model) / "model_index.json").is_file()
    ):
        raise ValueError(
            f"model {settings.model} is not a diffusers pipeline folder (no model_index.json); "
            "save one with pipe.save_pretrained(folder), or name an embedded model "
            f"({' or '.join(DEMO_MODELS)}; unset: unet)"
        )
    return settings


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
    from diffwidget.models.loader import DEMO_MODELS, load_demo_pipeline

    if settings.model is None or settings.model in DEMO_MODELS:
        return load_demo_pipeline(settings.model or "unet", device=device)  # type: ignore[arg-type]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(settings.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _error_record(error: Exception) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }


def _store_item(
    store: RunStore,
    key: str,
    base: dict[str, Any],
    output: Any,
    save_traces: bool,
) -> None:
    """Write the companions first, the result file last (it names their sizes)."""
    files = {}
    arrays_path = store.arrays_path(key)
    atomic_write(arrays_path, lambda p: np.savez(p, **output.arrays))
    files["arrays"] = store.file_entry(arrays_path)
    if save_traces and output.trace is not None:
        trace_path = store.trace_path(key)
        atomic_write(trace_path, output.trace.save)
        files["trace"] = store.file_entry(trace_path)
    write_json(store.item_path(key), {**base, "status": "ok", **output.record, "files": files})


def run(
    prompts: str | Path | Sequence[str],
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    shard: str | Shard | None = None,
    inference_steps: int = 20,
    guidance: float | None = None,
    model: str | None = None,
    pipe: Any = None,
    rise_masks: int = 500,
    n_random: int = 3,
    cells_per_stage: int | None = None,
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
    methods : sequence of {"attention", "df_rise", "df_cam"}, optional
        Maps computed at every explained step; default all three.
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
    rise_masks, n_random : int
        DF-RISE masks per map; random orders of the faithfulness baseline.
    cells_per_stage : int, optional
        Faithfulness stage size (default: the paper's, scaled to the latent grid).
    metrics : sequence of {"faithfulness", "segmentation", "roles", "probes"}, optional
        Default faithfulness, segmentation and roles; ``"probes"`` also records pooled
        activations (one more generation per item) for concept curves across the set.
    save_traces : bool
        Keep each item's Trace (``open_run(out).explorer(item_id)`` needs it).
    scene_metrics : bool, optional
        Score scene-world captions against the generated image (default: on for the
        embedded model).
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
        the run, a folder that holds another run.

    Examples
    --------
    >>> report = run("scene:4", "my-run", methods=["attention", "df_cam"])  # doctest: +SKIP
    >>> report.summary  # doctest: +SKIP
    PosixPath('my-run/summary/summary.md')
    """
    if aggregate:
        _check_aggregation_packages()
    items = load_prompts(prompts)
    settings = check_settings(
        RunSettings(
            methods=list(methods) if methods is not None else list(MAP_METHODS),
            steps=list(steps) if steps is not None else None,
            seeds=list(seeds),
            inference_steps=inference_steps,
            guidance=guidance,
            model=model,
            rise_masks=rise_masks,
            n_random=n_random,
            cells_per_stage=cells_per_stage,
            metrics=list(metrics) if metrics is not None else RunSettings().metrics,
            save_traces=save_traces,
        )
    )
    try:
        chosen_shard = Shard.parse(shard) if isinstance(shard, str) else shard or Shard(0, 1)
    except ValueError as error:
        raise RunSetupError(str(error)) from None
    if scene_metrics is None:
        scene_metrics = model is None
    store = RunStore(out)
    work = [
        (item, offset, item.generator_seed(offset)) for item in items for offset in settings.seeds
    ]
    manifest_settings = settings.to_json()
    if pipe is not None:
        manifest_settings["model"] = (
            f"<{type(pipe).__name__} passed in>" if model is None else model
        )
    procs = processes(device)
    with procs.main_first():
        store.open_manifest(manifest_settings, items)
    report = RunReport(Path(store.root), rank=procs.rank, processes=procs.count)
    mine = procs.split(chosen_shard.select(work))
    _compute(store, mine, settings, pipe, procs, report, scene_metrics, progress, on_item)
    if aggregate:
        _aggregate_when_finished(store, [item_key(i.id, s) for i, _o, s in work], report)
    return report


def _aggregate_when_finished(store: RunStore, keys: list[str], report: RunReport) -> None:
    """Write ``summary/`` when every item is finished and at least one succeeded."""
    statuses = [store.status(key) for key in keys]
    if not all(status in ("ok", "failed") for status in statuses):
        return
    if "ok" not in statuses:
        report.no_summary = (
            f"no summary written: all {len(keys)} items failed (see items/*.json for each error)"
        )
        return
    from diffwidget.runs.aggregation import aggregate as write_aggregate

    try:
        report.summary = write_aggregate(store.root)
    except OSError as error:
        raise _stop(report, f"writing {store.summary_dir}", error) from error


def _compute(
    store: RunStore,
    mine: list[tuple[PromptItem, int, int]],
    settings: RunSettings,
    pipe: Any,
    procs: Processes,
    report: RunReport,
    scene_metrics: bool,
    progress: bool,
    on_item: ItemCallback | None,
) -> None:
    from tqdm.auto import tqdm

    pending = [w for w in mine if store.status(item_key(w[0].id, w[2])) != "ok"]
    todo = {item_key(i.id, s) for i, _o, s in pending}
    report.skipped = [k for k in (item_key(i.id, s) for i, _o, s in mine) if k not in todo]
    if not pending:
        return
    if pipe is None:
        pipe = _load_pipeline(settings, procs.device)
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(pending),
        desc=f"process {procs.rank}/{procs.count}",
        position=procs.rank,
        unit="item",
        disable=not progress,
    )
    with bar:
        for item, offset, seed in pending:
            key = item_key(item.id, seed)
            with store.lock(key) as lock:
                if not lock.taken:
                    report.busy.append(key)
                    status = "busy"
                elif store.status(key) == "ok":  # finished by another process meanwhile
                    report.skipped.append(key)
                    status = "ok"
                else:
                    work = _Work(item, offset, seed, key)
                    status = _compute_one(
                        store, work, settings, pipe, procs, report, scene_metrics, lock
                    )
            bar.update()
            if on_item is not None and status in ("ok", "failed"):
                on_item(key, status)


@dataclass(frozen=True)
class _Work:
    item: PromptItem
    offset: int
    seed: int
    key: str


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
    work: _Work,
    settings: RunSettings,
    pipe: Any,
    procs: Processes,
    report: RunReport,
    scene_metrics: bool,
    lock: ItemLock,
) -> str:
    """Compute and store one item under its lock; ``"ok"``, ``"failed"`` or ``"busy"``."""
    key = work.key
    base = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "id": work.item.id,
        "seed": work.seed,
        "offset": work.offset,
        "prompt": work.item.prompt,
        # Who computed it: varies with the launch, never part of the results.
        "process": {"rank": procs.rank, "count": procs.count},
    }
    try:
        store.remove_stale_temporaries(key)
    except OSError as error:
        raise _stop(report, f"cleaning {store.root}", error) from error
    try:
        output = compute_item(pipe, work.item, work.seed, settings, scene_metrics=scene_metrics)
    except Exception as error:  # recorded, and the run goes on
        if isinstance(error, OSError) and error.errno in STOP_ERRNOS:
            raise _stop(report, f"computing item {key}", error) from error
        if not lock.owned():  # taken over while this process was stalled
            report.busy.append(key)
            return "busy"
        try:
            write_json(
                store.item_path(key), {**base, "status": "failed", "error": _error_record(error)}
            )
        except OSError as write_error:
            raise _stop(report, f"writing {store.item_path(key)}", write_error) from write_error
        report.failed.append(key)
        if report.first_error is None:
            report.first_error = f"{key}: {type(error).__name__}: {error}"
        return "failed"
    if not lock.owned():
        report.busy.append(key)
        return "busy"
    try:
        _store_item(store, key, base, output, settings.save_traces)
    except OSError as error:
        raise _stop(report, f"writing the files of item {key} in {store.root}", error) from error
    report.computed.append(key)
    return "ok"


__all__ = ["RunReport", "RunSetupError", "RunStoppedError", "check_settings", "run"]
