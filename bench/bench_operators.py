"""Which perturbation operator separates real saliency maps from random orders best?

Insertion/deletion AUC depends on what a "deleted" latent cell becomes. This benchmark
compares the operators of :class:`~diffwidget.explain.faithfulness.InsertionDeletion` on the
embedded model: ``zero`` (cells set to 0; insertion from an all-zero latent), ``blur``
(cells replaced by the Gaussian-blurred latent; insertion from it) and ``renoise`` (cells
replaced by fresh noise at the step's own noise level; insertion from such noise). The
paper's protocol (``paper``, the class's default) is zero-deletion with blur-insertion, i.e.
the deletion half of ``zero`` and the insertion half of ``blur``: it is reported from those
runs without a run of its own.

For each held-out caption of the scene world: one traced 20-step generation (seed = caption
index), three maps at one step (DF-RISE, DF-CAM, and cross-attention averaged over the
prompt's content words and all layers), and for each operator the AUCs of the three maps and
of seeded random orders (the same orders and the same fresh noise for every map). A map
"separates" from random when its deletion AUC is below (insertion AUC above) the random mean;
the effect size is the paired mean gain over its standard deviation (Cohen's d_z).

One command (writes the JSON and the section in bench/RESULTS_explain.md)::

    python bench/bench_operators.py --prompts 50 --threads 1 --json bench/operators.json \\
        --results bench/RESULTS_explain.md

``--prompts 2 --n-masks 50`` is a smoke run (a few minutes); ``--from-json FILE`` rebuilds
the table from a saved run (also a partial one: the JSON is written after every prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine
from resultslib import write_section

from diffwidget.explain.attention import AttentionMaps
from diffwidget.explain.cam import DFCam
from diffwidget.explain.faithfulness import InsertionDeletion
from diffwidget.explain.rise import DFRise
from diffwidget.models.loader import DEFAULT_GUIDANCE
from diffwidget.widget.explorer import FUNCTION_WORDS

OPERATORS = ("zero", "blur", "renoise")
#: Reported: the operators run, plus the paper's protocol assembled from them (the deletion
#: curves of "zero" and the insertion curves of "blur", random baselines alike).
REPORTED = (*OPERATORS, "paper")
MAPS = ("df_rise", "df_cam", "attention")
STEPS = 20
#: Step explained: the paper visualises step 15 of 20.
STEP = 15
N_RANDOM = 3


def attention_map(trace: Any, step: int) -> np.ndarray:
    """Cross-attention at ``step`` averaged over the prompt's content words (all layers)."""
    maps = AttentionMaps(steps=[step]).attribute(trace).maps[0]
    words = [
        i
        for i in trace.word_indices
        if trace.tokens[i].replace("</w>", "").lower() not in FUNCTION_WORDS
    ] or trace.word_indices
    return maps[words].mean(axis=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffwidget.models.scenes import SceneWorld
    from diffwidget.tracing.generate import trace

    if args.random_weights:
        from diffwidget.models.architecture import build_demo_pipeline

        pipe = build_demo_pipeline(seed=0)
    else:
        from diffwidget.models.loader import load_demo_pipeline

        pipe = load_demo_pipeline()
    captions = SceneWorld(seed=0).held_out_captions(args.first + args.prompts)[args.first :]
    rise = DFRise(n_masks=args.n_masks, progress_bar=False)
    cam = DFCam()
    # auc[operator][map or "random"][kind] -> one value per prompt
    auc: dict[str, dict[str, dict[str, list[float]]]] = {
        op: {who: {"deletion": [], "insertion": []} for who in (*MAPS, "random")}
        for op in OPERATORS
    }
    start = time.perf_counter()
    for i, caption in enumerate(captions, start=args.first):
        tr = trace(
            pipe, caption, num_inference_steps=STEPS, guidance_scale=args.guidance, seed=i,
            decode_previews=False,
        )  # fmt: skip
        maps = {
            "df_rise": rise.attribute(pipe, tr, args.step).raw,
            "df_cam": cam.attribute(pipe, tr, args.step).raw,
            "attention": attention_map(tr, args.step),
        }
        for op in OPERATORS:
            # One evaluator per operator and prompt: its random orders (and fresh noise) are
            # computed for the first map and reused for the others.
            evaluator = InsertionDeletion(operator=op, n_random=N_RANDOM, seed=i)
            for k, name in enumerate(MAPS):
                result = evaluator.evaluate(pipe, tr, args.step, maps[name])
                auc[op][name]["deletion"].append(result.saliency.deletion_auc)
                auc[op][name]["insertion"].append(result.saliency.insertion_auc)
                if k == 0:
                    auc[op]["random"]["deletion"].append(result.random.deletion_auc)
                    auc[op]["random"]["insertion"].append(result.random.insertion_auc)
        done = i + 1 - args.first
        print(
            f"[{done}/{len(captions)}] {caption!r} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        summary = summarise(auc, args, done, time.perf_counter() - start)
        if args.json is not None:
            # Written after every prompt, so an interrupted run keeps what it measured.
            args.json.write_text(json.dumps(summary, indent=2))
    return summarise(auc, args, len(captions), time.perf_counter() - start)


def separation(maps: list[float], random: list[float], kind: str) -> dict[str, float]:
    """Share of prompts beating random, mean paired gain, its sd and d_z = mean / sd."""
    gain = np.asarray(random) - np.asarray(maps)
    if kind == "insertion":
        gain = -gain
    sd = float(gain.std(ddof=1)) if len(gain) > 1 else float("nan")
    return {
        "beats_random": float(np.mean(gain > 0)),
        "gain_mean": float(gain.mean()),
        "gain_sd": sd,
        "effect_dz": float(gain.mean() / sd) if sd and sd > 0 else float("nan"),
    }


def with_paper(auc: dict) -> dict:
    """``auc`` plus the paper's protocol: zero-deletion with blur-insertion, per prompt."""
    out = {op: auc[op] for op in OPERATORS}
    out["paper"] = {
        who: {"deletion": auc["zero"][who]["deletion"], "insertion": auc["blur"][who]["insertion"]}
        for who in (*MAPS, "random")
    }
    return out


def summarise(auc: dict, args: argparse.Namespace, done: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"operators": {}}
    measured = auc
    auc = with_paper(auc)
    for op in REPORTED:
        entry: dict[str, Any] = {}
        for who in (*MAPS, "random"):
            entry[who] = {
                kind: {
                    "mean": float(np.mean(v)),
                    "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                }
                for kind, v in auc[op][who].items()
            }
        entry["separation"] = {
            name: {
                kind: separation(auc[op][name][kind], auc[op]["random"][kind], kind)
                for kind in ("deletion", "insertion")
            }
            for name in MAPS
        }
        dz = [
            entry["separation"][name][kind]["effect_dz"]
            for name in MAPS
            for kind in ("deletion", "insertion")
        ]
        entry["mean_effect_dz"] = float(np.nanmean(dz)) if done > 1 else float("nan")
        out["operators"][op] = entry
    out["per_prompt"] = measured
    out["settings"] = {
        "command": getattr(args, "command", ""),
        "prompts_done": done,
        "first": args.first,
        "n_masks": args.n_masks,
        "step": args.step,
        "steps": STEPS,
        "guidance": args.guidance,
        "n_random": N_RANDOM,
        "weights": "random" if args.random_weights else "shipped",
        "seconds": round(seconds, 1),
        "machine": machine(),
    }
    return out


def markdown(summary: dict[str, Any], command: str) -> str:
    """The self-contained section for bench/RESULTS_explain.md."""
    s = summary["settings"]
    m = s["machine"]
    ops = summary["operators"]
    best = max(REPORTED, key=lambda op: np.nan_to_num(ops[op]["mean_effect_dz"], nan=-1e9))
    lines = [
        "## Perturbation operators for insertion/deletion (the widget's faithfulness panel)",
        "",
        f"`{command}` ({s['seconds']:.0f} s; {m['cpu']}, {m['cores']} cores, torch threads "
        f"{m['torch_threads']}, load average {m['load_average']}; torch {m['torch']}, "
        f"diffusers {m['diffusers']}).",
        "",
        f"{s['prompts_done']} held-out captions (`SceneWorld(seed=0).held_out_captions`, "
        f"from index {s['first']}), {s['weights']} weights, {s['steps']} steps, CFG "
        f"{s['guidance']:g}, maps at step {s['step']}: DF-RISE ({s['n_masks']} masks), DF-CAM "
        "(default layers), cross-attention (mean over the content words, all layers). "
        f"Random: {s['n_random']} seeded orders per prompt, shared by the three maps. Cells: "
        "deletion AUC (lower is better) / insertion AUC (higher is better), mean ± sd over "
        "prompts; 'beats random' = share of prompts whose map beats the random mean; d_z = "
        "paired mean gain over random / its sd.",
        "",
        "| operator | map | deletion AUC | beats random | d_z | insertion AUC | beats random "
        "| d_z |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op in REPORTED:
        for who in (*MAPS, "random"):
            d, ins = ops[op][who]["deletion"], ops[op][who]["insertion"]
            row = f"| {op} | {who} | {d['mean']:.3f} ± {d['sd']:.3f} | "
            if who == "random":
                row += f"| | {ins['mean']:.3f} ± {ins['sd']:.3f} | | |"
            else:
                dele, inse = (
                    ops[op]["separation"][who]["deletion"],
                    ops[op]["separation"][who]["insertion"],
                )
                row += (
                    f"{dele['beats_random']:.0%} | {dele['effect_dz']:.2f} | "
                    f"{ins['mean']:.3f} ± {ins['sd']:.3f} | "
                    f"{inse['beats_random']:.0%} | {inse['effect_dz']:.2f} |"
                )
            lines.append(row)
    lines += [
        "",
        "Mean d_z over the three maps and both curves: "
        + ", ".join(f"{op} {ops[op]['mean_effect_dz']:.2f}" for op in REPORTED)
        + f". Largest: **{best}**.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--n-masks", type=int, default=500)
    parser.add_argument("--step", type=int, default=STEP)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="markdown file to update")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="rebuild the summary and the section from a saved run's --json (no computation)",
    )
    args = parser.parse_args(argv)
    args.command = (
        "python bench/bench_operators.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        settings = saved["settings"]
        for key in ("first", "n_masks", "step", "guidance"):
            setattr(args, key, settings[key])
        args.random_weights = settings["weights"] == "random"
        args.command = settings.get("command") or args.command
        summary = summarise(
            saved["per_prompt"], args, settings["prompts_done"], settings["seconds"]
        )
        summary["settings"]["machine"] = settings["machine"]  # where it was measured
    else:
        torch.set_num_threads(args.threads)
        summary = run(args)
    section = markdown(summary, args.command)
    print(section)
    if args.results is not None:
        write_section(args.results, "bench_operators", section)


if __name__ == "__main__":
    main()
