"""Every GPU measurement of ``bench/`` in one process, within about seven minutes of GPU time.

Parts, in the order they run (``--only`` / ``--skip`` choose; ``--list`` shows budgets):

* ``rise``: DF-RISE, 500 masks, one step, SD-1.5-shaped UNet, 64x64 latent: ours
  (``DFRise(n_masks=500)``, automatic batch) vs one UNet call per mask (the paper's call
  pattern, ``batch_size=1``), the batch chosen, peak CUDA memory, and the FLOP floor: the
  FLOPs of one CFG UNet call (``FlopCounterMode``) x 500 / the dense matmul peak measured
  in the same run;
* ``tracing_sd15``, ``tracing_sdxl``: the plain pipeline vs ``trace()`` with default tokens,
  all tokens and previews, 20 steps at 512² (SD-1.5) and 1024² (SDXL); bytes per step;
* ``cam_sd15``, ``cam_sdxl``: DF-CAM over its default layers and token relevance, per step;
* ``dit_sd3m``, ``dit_flux``: joint-attention capture on SD3-medium- and FLUX.1-shaped
  transformers at 1024² (``bench_dit``): time and peak memory against the plain call and
  against a full-softmax capture;
* ``rise_compile``: ``rise`` again with ``torch.compile(unet)``, compilation in an untimed
  run;
* ``train`` (only with ``--train`` or ``--only train``): the embedded model's training
  recipe on the device for a capped time, if it takes ``--device``.

Every model is built from published configs with random weights (time and memory depend
on shapes only) directly on the device; nothing is downloaded. Each part has a time budget:
repeats stop early when the next would not fit, and a hard stop comes at 1.25x the budget.
Results go to the JSON file as each measurement finishes, so a killed run keeps what it
measured; an exception in one part is recorded and the suite goes on. For a goal that is
not met, the top 10 kernels of a profile are kept in the JSON (``--profile``).

Output, in ``--out`` (default ``$OUT``): ``gpu_suite.json``, ``RESULTS.md`` with its GPU
section rewritten, and each ``RESULTS_*.md`` measured for with a dated section appended:
copies of ``bench/``'s files, to copy back there.

Examples
--------
On the GPU machine (``bench/gpu_wheels.sh`` prints the whole command)::

    python3 bench/gpu_suite.py --out "$OUT"

On the CPU with tiny shapes, a check of the plumbing, not a benchmark (well under a minute)::

    nice -n 10 python bench/gpu_suite.py --tiny --out /tmp/gpu-suite
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Nothing is downloaded: a hub lookup would only wait for a network the GPU machine lacks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_rise
import bench_tracing
import gpu_report
from benchlib import MIN_REPEATS, cuda_peak_mb, free_memory, machine, top_kernels
from gpu_parts import (
    NO_DYNAMO,
    PartSkipped,
    part_cam,
    part_dit,
    part_rise,
    part_rise_compile,
    part_tracing,
    part_train,
)

BENCH = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The hard stop of a part, as a multiple of its budget (the budget itself is cooperative).
HARD_FACTOR = 1.25
#: Share of a part's budget kept for what follows its timed rounds (peaks, profiles).
AFTER_ROUNDS_SHARE = 0.2
#: A part does not start with less than this share of its budget left in the suite's.
MIN_START_SHARE = 0.25
#: What each model key stands for in the reports.
LABELS = {
    "sd15": "SD-1.5-shaped",
    "sdxl": "SDXL-base-shaped",
    "sd3m": "SD3-medium-shaped",
    "flux": "FLUX.1-dev-shaped",
}
TINY_LABELS = {
    "sd15": "tiny test (for SD-1.5)",
    "sdxl": "tiny test SDXL-style (for SDXL)",
    "sd3m": "tiny test SD3-style (for SD3-medium)",
    "flux": "tiny test Flux-style (for FLUX.1)",
}


@dataclass(frozen=True)
class Shapes:
    """Problem sizes and time budgets of one kind of run (full GPU shapes or tiny)."""

    n_masks: int
    paper_masks: int  # masks per timed one-call-per-mask run, scaled to n_masks
    repeats: int
    steps: int
    sizes: dict[str, int]  # image side per pipeline
    dit_size: int
    dit_steps: int  # denoiser calls per timed DiT round
    matmul_n: int
    budget_s: float
    part_budget_s: dict[str, float]


FULL = Shapes(
    n_masks=500,
    paper_masks=100,
    repeats=MIN_REPEATS,
    steps=20,
    sizes={"sd15": 512, "sdxl": 1024},
    dit_size=1024,
    dit_steps=2,
    matmul_n=8192,
    budget_s=420.0,
    part_budget_s={
        "rise": 75,
        "tracing_sd15": 45,
        "cam_sd15": 20,
        "tracing_sdxl": 120,
        "cam_sdxl": 40,
        "dit_sd3m": 40,
        "dit_flux": 80,
        "rise_compile": 180,
        "train": 180,
    },
)
TINY = Shapes(
    n_masks=8,
    paper_masks=4,
    repeats=MIN_REPEATS,
    steps=2,
    sizes={"sd15": 32, "sdxl": 32},
    dit_size=64,
    dit_steps=1,
    matmul_n=256,
    budget_s=120.0,
    part_budget_s=dict.fromkeys(FULL.part_budget_s, 20.0),
)


class PartTimeout(BaseException):
    """A part ran past its hard limit (a BaseException, so no ``except Exception`` eats it)."""


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: Any) -> None:
        raise PartTimeout(f"stopped at its hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Suite:
    """The run's settings, model cache, deadline and record (the JSON file's content)."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.tiny: bool = args.tiny
        shapes = TINY if args.tiny else FULL
        self.shapes = replace(shapes, repeats=args.repeats or shapes.repeats)
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.out = Path(args.out)
        self.deadline = math.inf
        self.budget = math.inf
        self.traces: dict[str, Any] = {}
        self._models: dict[str, Any] = {}
        self.record: dict[str, Any] = {
            "suite": {
                "started": now_utc(),
                "argv": argv,
                "tiny": self.tiny,
                "device": str(self.device),
                "dtype": args.dtype,
                "budget_s": args.budget_s,
                "shapes": asdict(self.shapes),
                "min_repeats": MIN_REPEATS,
            },
            "machine": machine(self.device),
            "builds_s": {},
            "parts": {},
            "goals": {},
        }

    # ---------------------------------------------------------------- time
    def left(self) -> float:
        """Seconds left in the running part's budget."""
        return self.deadline - time.monotonic()

    def rounds_left(self) -> float:
        """Seconds left for timed rounds: the budget less what comes after them."""
        return self.left() - AFTER_ROUNDS_SHARE * self.budget

    # ---------------------------------------------------------------- models
    def model(self, key: str) -> Any:
        """The pipeline ``key`` ("sd15" or "sdxl"), built once (tiny ones with ``--tiny``)."""
        if key not in self._models:
            tiny = {"sd15": "tiny", "sdxl": "tiny_sdxl"}
            builder = bench_tracing.BUILDERS[tiny[key] if self.tiny else key]
            start = time.perf_counter()
            self._models[key] = builder(str(self.device), self.dtype)
            self.record["builds_s"][key] = time.perf_counter() - start
        return self._models[key]

    def drop_models(self) -> None:
        """Forget every built model and trace (after a failure they may be half-modified)."""
        self._models.clear()
        self.traces.clear()
        free_memory()

    def trace_of(self, key: str) -> Any:
        """A traced run of pipeline ``key``: the tracing part's warm-up, else a new one."""
        if key not in self.traces:
            calls = bench_tracing.variant_calls(
                self.model(key), self.shapes.sizes[key], self.shapes.steps
            )
            self.traces[key] = calls["trace"]()
        return self.traces[key]

    def rise_trace(self) -> tuple[Any, int]:
        """``bench_rise``'s synthetic trace on the SD-1.5 pipeline and the step explained."""
        if "rise" not in self.traces:
            self.traces["rise"] = bench_rise.synthetic_trace(self.model("sd15"), self.device)
        trace = self.traces["rise"]
        # A synthetic trace records no noise schedule, so replay reads the live scheduler's:
        # set it back to the trace's steps, which another part's generation may have changed.
        self.model("sd15").scheduler.set_timesteps(trace.n_steps)
        return trace, min(bench_rise.BENCH_STEP, trace.n_steps - 1)

    # ---------------------------------------------------------------- measuring
    def seconds(self, fn: Callable[[], Any]) -> float:
        """Wall seconds of one ``fn()``, the device synchronised before and after."""
        return bench_tracing.timed(fn, str(self.device))[0]

    def peak(self, fn: Callable[[], Any]) -> tuple[Any, float | None]:
        return cuda_peak_mb(fn, self.device)

    def label(self, key: str) -> str:
        return (TINY_LABELS if self.tiny else LABELS)[key]

    def met(self, ok: bool) -> bool | None:
        """Whether a goal is met; None with tiny shapes, whose numbers say nothing of it."""
        return None if self.tiny else bool(ok)

    def goal(
        self, key: str, part: str, what: str, value: Any, target: str, ok: bool
    ) -> bool | None:
        met = self.met(ok)
        self.record["goals"][key] = {
            "part": part,
            "what": what,
            "value": value,
            "goal": target,
            "met": met,
        }
        return met

    def profile(self, met: bool | None, fn: Callable[[], Any], memory: bool = False) -> Any:
        """The top kernels of ``fn()`` when the goal is not met (or ``--profile always``)."""
        if self.args.profile == "always" or (self.args.profile == "failed" and met is False):
            return top_kernels(fn, self.device, memory=memory)
        return None

    # ---------------------------------------------------------------- output
    def save(self) -> None:
        """Write the JSON file and the RESULTS copies (atomically, after every measurement)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "gpu_suite.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(tmp, path)
        gpu_report.write(self.record, Path(self.args.results_from), self.out, PARTS_REPORT)


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Suite, dict[str, Any]], None]
    report: str  # the RESULTS file it reports in
    optional: bool = False


PARTS = (
    Part("rise", part_rise, "RESULTS_explain.md"),
    Part("tracing_sd15", part_tracing("sd15"), "RESULTS_tracing.md"),
    Part("cam_sd15", part_cam("sd15"), "RESULTS_explain.md"),
    Part("tracing_sdxl", part_tracing("sdxl"), "RESULTS_tracing.md"),
    Part("cam_sdxl", part_cam("sdxl"), "RESULTS_explain.md"),
    Part("dit_sd3m", part_dit("sd3m"), "RESULTS_tracing.md"),
    Part("dit_flux", part_dit("flux"), "RESULTS_tracing.md"),
    Part("rise_compile", part_rise_compile, "RESULTS_explain.md"),
    Part("train", part_train, "RESULTS_model.md", optional=True),
)
PARTS_REPORT = {part.name: part.report for part in PARTS}


# ==================================================================== runner
def run_part(suite: Suite, part: Part, budget: float) -> None:
    rec: dict[str, Any] = {"status": "running", "budget_s": budget, "started": now_utc()}
    suite.record["parts"][part.name] = rec
    suite.save()
    print(f"[gpu_suite] {part.name}: start (budget {budget:.0f} s)", flush=True)
    start = time.perf_counter()
    suite.deadline, suite.budget = time.monotonic() + budget, budget
    try:
        with hard_limit(budget * HARD_FACTOR):
            part.run(suite, rec)
        rec["status"] = "ok"
    except PartSkipped as exc:
        rec["status"], rec["note"] = "skipped", str(exc)
    except PartTimeout as exc:
        rec["status"], rec["error"] = "timeout", str(exc)
        suite.drop_models()
    # One part's failure must not stop the others; the error and traceback are recorded.
    except Exception as exc:
        rec["status"], rec["error"] = "error", f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=12)
        suite.drop_models()
    finally:
        suite.deadline, suite.budget = math.inf, math.inf
        rec["part_s"] = time.perf_counter() - start
        free_memory()
        suite.save()
    print(
        f"[gpu_suite] {part.name}: {rec['status']} in {rec['part_s']:.1f} s"
        + (f" ({rec.get('error') or rec.get('note')})" if rec["status"] != "ok" else ""),
        flush=True,
    )


def chosen_parts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Part]:
    names = [part.name for part in PARTS]

    def parse(text: str | None) -> set[str]:
        picked = {n.strip() for n in (text or "").split(",") if n.strip()}
        unknown = picked - set(names)
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(names)}")
        return picked

    only, skip = parse(args.only), parse(args.skip)
    return [
        part
        for part in PARTS
        if (part.name in only if only else not part.optional or args.train)
        and part.name not in skip
    ]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder ($OUT)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a plumbing check")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16")
    parser.add_argument("--only", default=None, help="comma-separated parts to run")
    parser.add_argument("--skip", default=None, help="comma-separated parts to leave out")
    parser.add_argument("--list", action="store_true", help="print the parts and exit")
    parser.add_argument("--budget-s", type=float, default=None, help="whole suite (420; 120)")
    parser.add_argument(
        "--part-budget",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="override one part's budget (repeatable)",
    )
    parser.add_argument("--profile", choices=("failed", "always", "never"), default="failed")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help=f"torch.compile backend (default inductor; with --tiny {NO_DYNAMO!r}: dynamo off)",
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode")
    parser.add_argument("--train", action="store_true", help="also run the training part")
    parser.add_argument("--train-module", default="diffwidget.models.train")
    parser.add_argument("--train-args", default="", help="extra arguments of the recipe")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per measurement (default {MIN_REPEATS}; fewer are flagged)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--results-from", default=str(BENCH), help="folder of the RESULTS files to extend"
    )
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else FULL
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    args.compile_backend = args.compile_backend or (NO_DYNAMO if args.tiny else "inductor")
    args.budget_s = args.budget_s or shapes.budget_s
    budgets = dict(shapes.part_budget_s)
    for item in args.part_budget:
        name, _, value = item.partition("=")
        if name not in budgets or not value:
            parser.error(f"--part-budget takes PART=SECONDS with PART one of {sorted(budgets)}")
        budgets[name] = float(value)
    args.budgets = budgets
    if args.list:
        return args, parser
    if not args.out:
        parser.error("pass --out DIR (on the GPU machine $OUT is used when set)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; run on the GPU machine, or pass --tiny for the CPU")
    if args.device == "cpu" and not args.tiny:
        parser.error("full shapes on the CPU would take hours; pass --tiny (or --device cuda)")
    return args, parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen parts and return the record written to ``gpu_suite.json``."""
    args, parser = parse_args(argv)
    parts = chosen_parts(args, parser)
    if args.list:
        for part in PARTS:
            flag = "" if part in parts else " (not chosen)"
            print(f"{part.name:14s} {args.budgets[part.name]:6.0f} s  {part.report}{flag}")
        return {}
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    suite = Suite(args, sys.argv[1:] if argv is None else argv)
    suite_end = time.monotonic() + args.budget_s
    for part in parts:
        budget = min(args.budgets[part.name], suite_end - time.monotonic())
        if budget < MIN_START_SHARE * args.budgets[part.name]:
            suite.record["parts"][part.name] = {
                "status": "skipped",
                "note": f"out of the suite's time budget ({args.budget_s:.0f} s)",
            }
            suite.save()
            continue
        run_part(suite, part, budget)
    suite.record["suite"]["finished"] = now_utc()
    suite.save()
    print(gpu_report.summary_text(suite.record), flush=True)
    return suite.record


if __name__ == "__main__":
    main()
