"""Markdown of a ``gpu_suite.py`` record: dated sections for ``RESULTS_*.md`` and the GPU
block of ``RESULTS.md``'s summary.

Everything here reads the record (the content of ``gpu_suite.json``) and nothing else, so
the same JSON always gives the same text; ``python bench/gpu_report.py gpu_suite.json
--out DIR`` renders a saved record again.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN = "<!-- gpu-suite:begin -->"
END = "<!-- gpu-suite:end -->"
SUMMARY = "RESULTS.md"
Row = tuple[str, str, str, str, str]  # area, what, result, goal, met
VARIANTS = ("trace", "trace_all_tokens", "trace_previews")


# ==================================================================== small formats
def _s(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{value:+.1%}"


def _mb(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _met(goal: dict[str, Any] | None, tiny: bool) -> str:
    if goal is None:
        return "—"
    if goal["met"] is None:
        return "n/a (tiny shapes)" if tiny else "not measured"
    return "yes" if goal["met"] else "**no** (profile in `gpu_suite.json`)"


def _runs(n: int, record: dict[str, Any]) -> str:
    least = record["suite"]["min_repeats"]
    return f"{n}" if n >= least else f"{n} (fewer than {least})"


def _median(entry: dict[str, Any] | None) -> Any:
    return None if entry is None else entry.get("median_s")


def machine_line(record: dict[str, Any]) -> str:
    m = record["machine"]
    gpu = (
        f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB, {m.get('gpu_multiprocessors')} SMs), "
        f"driver {m.get('driver')}, CUDA {m.get('cuda')}; "
        if "gpu" in m
        else "no GPU; "
    )
    return (
        f"{gpu}{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
        f"Python {m['python']}"
    )


def heading(record: dict[str, Any]) -> list[str]:
    suite = record["suite"]
    date = suite["started"][:10]
    where = record["machine"].get("gpu", record["machine"]["cpu"])
    title = (
        f"## GPU suite plumbing check: tiny shapes on {where}, {date} (not a benchmark)"
        if suite["tiny"]
        else f"## GPU suite: {where}, {suite['dtype']}, {date}"
    )
    argv = " ".join(suite["argv"])
    return [
        title,
        "",
        f"- machine: {machine_line(record)}",
        f"- command: `python3 bench/gpu_suite.py {argv}`; random weights from published "
        "configs (timings depend on shapes only); warm-up excluded; started "
        f"{suite['started']}; every number is in `gpu_suite.json`",
        "",
    ]


# ==================================================================== per-part sections
def _grid(shape: list[int]) -> str:
    return "x".join(str(v) for v in shape)


def _verdict(record: dict[str, Any], key: str) -> str:
    goal = record["goals"].get(key)
    return "" if goal is None else f"{goal['goal']}: {_met(goal, record['suite']['tiny'])}"


# Renderers index the numbers a part must have (a KeyError means it has none to show) and
# read the optional ones with .get.
def rise_lines(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[str]:
    label = "eager" if name == "rise" else f"torch.compile (backend {rec.get('backend')})"
    n, paper_n = rec["n_masks"], rec["one_call_per_mask_masks_per_run"]
    ours, paper = rec["ours"], rec["one_call_per_mask"]
    peaks = rec.get("peak_cuda_mb", {})
    scaled = "" if paper_n == n else f" (measured on {paper_n} masks per run, scaled to {n})"
    lines = [
        f"### DF-RISE, {n} masks, one step, {label}: {rec['model']} UNet "
        f"({_s(rec['unet_params_M'], 4)} M params), latent {_grid(rec['latent'])}",
        "",
        "| variant | median (s) | runs | batch | peak CUDA memory (MiB) |",
        "|---|---|---|---|---|",
        f"| ours | {_s(ours['median_s'])} | {_runs(ours['n'], record)} | {rec['batch_size']} "
        f"({rec['batch_size_source']}) | {_mb(peaks.get('ours'))} |",
        f"| one UNet call per mask | {_s(paper['median_s'])}{scaled} | "
        f"{_runs(paper['n'], record)} | 1 | "
        f"{_mb(peaks.get('one_call_per_mask'))} |",
        "",
        f"- speedup over one call per mask: **{_s(rec['speedup'])}x**; the untimed first runs "
        f"of both (warm-up{', compilation' if name != 'rise' else ''}): "
        f"{_s(rec.get('first_runs_s'))} s",
    ]
    if "floor_s" in rec:
        mm = rec["matmul"]
        lines.append(
            f"- FLOP floor: {rec['flops_per_cfg_call'] / 1e12:.3g} TFLOP per CFG UNet call "
            f"(FlopCounterMode) x {n} / {mm['flops_per_s'] / 1e12:.4g} TFLOP/s (best of 5 "
            f"batches of {mm['products_per_batch']} {mm['n']}³ {mm['dtype']} matmuls, same "
            f"run) = **{_s(rec['floor_s'])} s**; ours = {_s(rec.get('ours_over_floor'))}x "
            "the floor"
        )
    if name in record["goals"]:
        lines.append(f"- goal {_verdict(record, name)}")
    return lines


def cam_lines(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[str]:
    cam = rec["cam"]
    lines = [
        f"### DF-CAM and token relevance, {rec['model']} pipeline at {rec['size']}², step "
        f"{rec['step']} of a traced run",
        "",
        f"- DF-CAM over its {cam['layers']} default layers (one forward + one backward): "
        f"{_s(cam['median_s'])} s (median of {_runs(cam['n'], record)}; peak CUDA memory "
        f"{_mb(cam.get('peak_cuda_mb'))} MiB)",
    ]
    rel = rec.get("relevance")
    if rel is not None:
        lines.append(
            f"- token relevance, one step: {_s(rel['median_s'])} s (median of "
            f"{_runs(rel['n'], record)}; "
            f"through the text encoder: {rel.get('text_encoder_used')}; peak CUDA memory "
            f"{_mb(rel.get('peak_cuda_mb'))} MiB)"
        )
    return lines


def tracing_lines(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[str]:
    medians = rec["wall_seconds_median"]
    stored = rec["bytes_per_step_stored"]
    lines = [
        f"### Tracing overhead, {rec['model']} pipeline ({_s(rec['unet_params_M'], 5)} M UNet "
        f"params), {rec['size']}², {rec['steps']} steps, {_runs(rec['rounds'], record)} "
        "interleaved rounds",
        "",
        "| variant | wall median (s) | overhead of medians | paired median overhead | "
        "bytes / step | goal |",
        "|---|---|---|---|---|---|",
        f"| plain | {_s(medians['plain'])} | — | — | — | |",
    ]
    for variant in VARIANTS:
        if variant in medians:
            lines.append(
                f"| {variant} | {_s(medians[variant])} | "
                f"{_pct(rec['wall_overhead_vs_plain'][variant])} | "
                f"{_pct(rec['wall_paired_overhead_median'][variant])} | "
                f"{stored[variant]:,} ({stored[variant] / 2**20:.2f} MB) | "
                f"{_verdict(record, f'{name}_{variant}')} |"
            )
    if "cuda_max_memory_allocated_mb" in rec:
        peak = rec["cuda_max_memory_allocated_mb"]
        lines += ["", f"- peak CUDA memory allocated by the process so far: {peak:,.0f} MB"]
    return lines


def dit_lines(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[str]:
    per_call, over = rec["per_call"], rec["overhead_vs_plain"]
    peaks, extra = rec.get("peak_cuda_mb", {}), rec.get("peak_extra_mb", {})
    lines = [
        f"### Joint-attention capture, {rec['model']} transformer ({_s(rec['params_M'], 5)} M "
        f"params), {rec['size']}² ({rec['image_tokens']} image + {rec['text_tokens']} text "
        f"tokens), median of {_runs(per_call['plain']['n'], record)} rounds, "
        f"{rec['calls_per_round']} call(s) each",
        "",
        "| variant | per call, median (s) | overhead | peak CUDA memory of one call (MiB) | "
        "extra over plain (MiB) |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "plain": "plain",
        "ours": "ours (SDPA's log-sum-exp)",
        "recompute": "ours, log-sum-exp formed again (other backends)",
        "full": "full softmax",
    }
    for kind, label in labels.items():
        if kind not in per_call:
            continue
        lines.append(
            f"| {label} | {_s(per_call[kind]['median_s'])} | {_pct(over.get(kind))} | "
            f"{_mb(peaks.get(kind))} | {_mb(extra.get(kind))} |"
        )
    analytic = rec.get("analytic_one_capture_mb", {})
    verdict = _verdict(record, name)
    lines += [
        "",
        f"- full / ours, extra peak memory: {_s(rec.get('full_over_ours_extra'))}x"
        + (f" (goal {verdict})" if verdict else "")
        + (f"; {rec['peak_note']}" if "peak_note" in rec else ""),
        f"- analytic float32 temporaries of one capture call: full {_mb(analytic.get('full_mb'))} "
        f"MB, ours {_mb(analytic.get('ours_mb'))} MB ({_s(analytic.get('ratio'))}x)",
    ]
    return lines


def train_result(rec: dict[str, Any]) -> str:
    how = (
        "stopped at the part's time cap"
        if rec["stopped_at_cap"]
        else f"exited with {rec.get('returncode')}"
    )
    return (
        f"{_s(rec['seconds'])} s, {how}; weights brought back: {rec.get('weights_file') or 'none'}"
    )


def train_lines(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[str]:
    return [
        "### Training recipe on the device",
        "",
        f"- `python {rec['command']}`: {train_result(rec)}",
        "- last lines of its log:",
        "",
        "```",
        *rec.get("log_tail", [])[-10:],
        "```",
    ]


RENDER: dict[str, Callable[[str, dict[str, Any], dict[str, Any]], list[str]]] = {
    "rise": rise_lines,
    "rise_compile": rise_lines,
    "cam": cam_lines,
    "tracing": tracing_lines,
    "dit": dit_lines,
    "train": train_lines,
}


def _kind(name: str) -> str:
    return name if name in RENDER else name.split("_")[0]


def part_lines(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[str]:
    status = rec.get("status")
    if status == "skipped":
        return [f"### `{name}`: skipped", "", f"- {rec.get('note')}"]
    try:
        lines = RENDER[_kind(name)](name, rec, record)
    except KeyError:
        lines = [f"### `{name}`", "", "- no numbers"]
    if status == "running":
        lines += ["", "- **did not finish**: the run ended during this part; numbers are partial"]
    elif status in ("error", "timeout"):
        lines += ["", f"- **{status}**: {rec.get('error')}"]
    return lines


def section(record: dict[str, Any], names: list[str]) -> str:
    lines = heading(record)
    for name in names:
        lines += [*part_lines(name, record["parts"][name], record), ""]
    return "\n".join(lines)


# ==================================================================== RESULTS.md summary rows
def summary_rows(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[Row]:
    """The part's rows; a part stopped early shows what it measured, marked as partial."""
    status = rec.get("status")
    why = rec.get("note") or rec.get("error") or "did not finish"
    unmeasured = [(name, f"`{name}`", f"{status}: {why}", "—", "not measured")]
    if status == "skipped":
        return unmeasured
    try:
        rows = number_rows(name, rec, record)
    except KeyError:
        return unmeasured if status != "ok" else [(name, f"`{name}`", "no numbers", "—", "—")]
    if status == "ok":
        return rows
    return [(a, f"{w} (**{status}**: {why}; partial)", r, g, m) for a, w, r, g, m in rows]


def number_rows(name: str, rec: dict[str, Any], record: dict[str, Any]) -> list[Row]:
    goals, tiny = record["goals"], record["suite"]["tiny"]
    kind = _kind(name)
    if kind in ("rise", "rise_compile"):
        how = "eager" if name == "rise" else "torch.compile"
        floor = f"; FLOP floor {_s(rec['floor_s'])} s" if "floor_s" in rec else ""
        return [
            (
                "DF-RISE",
                f"{rec['n_masks']} masks, one step, {rec['model']} UNet, latent "
                f"{_grid(rec['latent'])}, {how}: ours vs one UNet call per mask",
                f"{_s(rec['ours']['median_s'])} s vs {_s(rec['one_call_per_mask']['median_s'])} "
                f"s ({_s(rec['speedup'])}x); batch {rec['batch_size']}{floor}",
                goals[name]["goal"],
                _met(goals.get(name), tiny),
            )
        ]
    if kind == "tracing":
        variants = [v for v in VARIANTS if v in rec["mb_per_step_stored"]]
        picked = [goals.get(f"{name}_{v}") for v in variants]
        return [
            (
                "tracing",
                f"overhead vs plain, {rec['model']} {rec['size']}², {rec['steps']} steps: "
                + " / ".join(variants)
                + " (paired median, wall); MB per step",
                " / ".join(_pct(rec["wall_paired_overhead_median"][v]) for v in variants)
                + "; "
                + " / ".join(f"{rec['mb_per_step_stored'][v]:.2f}" for v in variants)
                + " MB",
                " / ".join(g["goal"] if g else "—" for g in picked),
                " / ".join(_met(g, tiny) for g in picked),
            )
        ]
    if kind == "cam":
        return [
            (
                "DF-CAM / token relevance",
                f"per step, {rec['model']} {rec['size']}², DF-CAM over {rec['cam']['layers']} "
                "default layers",
                f"{_s(rec['cam']['median_s'])} s / {_s(rec['relevance']['median_s'])} s",
                "—",
                "—",
            )
        ]
    if kind == "dit":
        extra, over = rec.get("peak_extra_mb", {}), rec["overhead_vs_plain"]
        return [
            (
                "DiT capture",
                f"{rec['model']} {rec['size']}²: time overhead ours / full softmax; extra peak "
                "memory ours / full",
                f"{_pct(over['ours'])} / {_pct(over['full'])}; {_mb(extra.get('ours'))} / "
                f"{_mb(extra.get('full'))} MiB ({_s(rec.get('full_over_ours_extra'))}x)",
                goals[name]["goal"] + " less",
                _met(goals.get(name), tiny),
            )
        ]
    return [("training", f"`python {rec['command']}`", train_result(rec), "—", "—")]


def summary_block(record: dict[str, Any], parts_report: dict[str, str]) -> str:
    tiny = record["suite"]["tiny"]
    intro = (
        "Plumbing check of `bench/gpu_suite.py` with tiny shapes on the CPU: **not GPU "
        "numbers**; the goals are not judged."
        if tiny
        else "Measured by `bench/gpu_suite.py` in one run, fp16, random weights from published "
        "configs (timings depend on shapes only), warm-up excluded, medians of at least 5 runs "
        "unless the linked section says otherwise. Every number: `bench/gpu_suite.json`."
    )
    lines = [
        BEGIN,
        "## GPU numbers",
        "",
        intro,
        "",
        f"**Machine**: {machine_line(record)}; run started {record['suite']['started']}.",
        "",
        "| area | what | result | goal | met | file |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in record["parts"].items():
        report = parts_report[name]
        link = f"[{report.removeprefix('RESULTS_').removesuffix('.md')}]({report})"
        for row in summary_rows(name, rec, record):
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + f" | {link} |")
    lines += ["", END]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the GPU markers replaced (appended if there is none)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


# ==================================================================== files
def write(
    record: dict[str, Any], source: Path, out: Path, parts_report: dict[str, str]
) -> list[Path]:
    """Write ``RESULTS.md`` and each measured ``RESULTS_*.md`` from ``source`` into ``out``."""
    by_file: dict[str, list[str]] = {}
    for name in record["parts"]:
        by_file.setdefault(parts_report[name], []).append(name)
    written = []
    for filename, names in by_file.items():
        text = (source / filename).read_text()
        path = out / filename
        path.write_text(text.rstrip("\n") + "\n\n" + section(record, names) + "\n")
        written.append(path)
    path = out / SUMMARY
    path.write_text(
        replace_block((source / SUMMARY).read_text(), summary_block(record, parts_report))
    )
    written.append(path)
    return written


def summary_text(record: dict[str, Any]) -> str:
    """Plain-text summary for the log: each part's status, each goal, what to run again."""
    lines = ["", "== gpu_suite summary =="]
    for name, rec in record["parts"].items():
        extra = rec.get("error") or rec.get("note") or ""
        lines.append(f"{name:14s} {rec.get('status'):8s} {_s(rec.get('part_s'))} s  {extra}")
    for key, goal in record["goals"].items():
        lines.append(
            f"goal {key}: {goal['what']} = {goal['value']} ({goal['goal']}): {goal['met']}"
        )
    again = [
        n for n, r in record["parts"].items() if r.get("status") in ("error", "timeout", "running")
    ]
    if again:
        lines.append(f"to run again: python3 bench/gpu_suite.py --only {','.join(again)} --out DIR")
    return "\n".join(lines)


def main() -> None:
    import gpu_suite

    parser = argparse.ArgumentParser(description="Render a saved gpu_suite.json again.")
    parser.add_argument("record", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--results-from", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    record = json.loads(args.record.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write(record, args.results_from, args.out, gpu_suite.PARTS_REPORT):
        print(path)


if __name__ == "__main__":
    main()
