"""The GPU suite's plumbing, on the CPU with tiny shapes.

These tests check what the suite records and writes (parts, budgets, failures, reports,
the numbers' internal consistency against independent computations); they say nothing
about GPU speed, which only a run on the GPU measures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_dit  # noqa: E402
import bench_tracing  # noqa: E402
import benchlib  # noqa: E402
import gpu_report  # noqa: E402
import gpu_suite  # noqa: E402
from gpu_suite import Part  # noqa: E402

REAL_PARTS = "rise,tracing_sd15,cam_sdxl,dit_sd3m"


#: Tests that run models (tiny ones, but with imports and builds: seconds each here).
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One real tiny run of four parts, two timed runs each (flagged as fewer than 5)."""
    out = tmp_path_factory.mktemp("gpu-suite")
    record = gpu_suite.main(["--tiny", "--out", str(out), "--only", REAL_PARTS, "--repeats", "2"])
    return record, out


def fake_suite(monkeypatch: pytest.MonkeyPatch, parts: list[Part]) -> None:
    monkeypatch.setattr(gpu_suite, "PARTS", tuple(parts))


# ==================================================================== a real tiny run
@slow
def test_every_chosen_part_ran_and_the_json_on_disk_is_the_record(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    record, out = tiny_run
    assert list(record["parts"]) == REAL_PARTS.split(",")
    assert {name: rec["status"] for name, rec in record["parts"].items()} == dict.fromkeys(
        record["parts"], "ok"
    )
    on_disk = json.loads((out / "gpu_suite.json").read_text())
    assert on_disk == json.loads(json.dumps(record, default=str))
    assert on_disk["machine"]["torch_threads"] == 1
    # Tiny shapes judge no goal, so nothing is profiled by default.
    assert {g["met"] for g in record["goals"].values()} == {None}
    assert record["parts"]["rise"]["profile"] is None


@slow
def test_rise_counts_one_cfg_unet_call_and_derives_the_floor_from_it(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffwidget.testing.tiny import tiny_sd_pipeline

    rec = tiny_run[0]["parts"]["rise"]
    # Independently: FLOPs of the UNet itself at the CFG batch of two (counts depend on
    # shapes only), so a count of one half or of two calls would differ by 2x.
    unet = tiny_sd_pipeline().unet
    h, w = rec["latent"]
    x = torch.zeros(2, unet.config.in_channels, h, w)
    text = torch.zeros(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor(500), encoder_hidden_states=text)
    assert rec["flops_per_cfg_call"] == fc.get_total_flops() > 0
    assert rec["floor_s"] == pytest.approx(
        rec["flops_per_cfg_call"] * rec["n_masks"] / rec["matmul"]["flops_per_s"]
    )
    assert rec["speedup"] == pytest.approx(
        rec["one_call_per_mask"]["median_s"] / rec["ours"]["median_s"]
    )
    assert rec["ours"]["n"] == rec["one_call_per_mask"]["n"] == 2
    scale = rec["n_masks"] / rec["one_call_per_mask_masks_per_run"]
    assert scale == 2
    assert rec["one_call_per_mask"]["runs_s"] == pytest.approx(
        [t * scale for t in rec["one_call_per_mask_measured_s"]]
    )
    assert rec["batch_size"] == rec["n_masks"] == 8
    assert rec["peak_cuda_mb"] == {"ours": None, "one_call_per_mask": None}


@slow
def test_tracing_bytes_per_step_match_the_estimate_made_before_running(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    from diffwidget.tracing.context import TraceContext

    rec = tiny_run[0]["parts"]["tracing_sd15"]
    pipe = bench_tracing.build_tiny("cpu", torch.float32)
    settings = {
        "trace": ("default", False),
        "trace_all_tokens": ("all", False),
        "trace_previews": ("default", True),
    }
    for variant, (tokens, previews) in settings.items():
        ctx = TraceContext(
            pipe, prompt=bench_tracing.PROMPT, tokens=tokens, decode_previews=previews
        )
        assert rec["bytes_per_step_stored"][variant] == ctx.step_bytes(32, 32).total
    assert rec["rounds"] == 2
    assert all(len(v) == 2 for v in rec["wall_seconds_all"].values())


@slow
def test_cam_makes_its_own_sdxl_trace_and_reports_per_step_times(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    rec = tiny_run[0]["parts"]["cam_sdxl"]
    assert rec["step"] == tiny_run[0]["suite"]["shapes"]["steps"] - 1
    assert rec["cam"]["layers"] > 0
    assert rec["cam"]["n"] == rec["relevance"]["n"] == 2
    # SDXL's two encoders: relevance uses the recorded embedding (R_tt = I).
    assert rec["relevance"]["text_encoder_used"] is False


@slow
def test_dit_gives_the_analytic_numbers_and_no_cpu_peak(
    tiny_run: tuple[dict[str, Any], Path],
) -> None:
    from diffwidget.testing.tiny_dit import tiny_sd3_pipeline

    record = tiny_run[0]
    rec = record["parts"]["dit_sd3m"]
    cfg = tiny_sd3_pipeline().transformer.config
    assert rec["image_tokens"] == (64 // 8 // 2) ** 2
    assert rec["analytic_one_capture_mb"] == bench_dit.analytic_extra_mb(
        cfg.num_attention_heads, rec["image_tokens"], 77 + 256, cfg.attention_head_dim
    )
    assert set(rec["per_call"]) == {"plain", "ours", "recompute", "full"}
    assert "CUDA only" in rec["peak_note"]
    assert record["goals"]["dit_sd3m"]["value"] is None


@slow
def test_reports_extend_the_source_files_and_render_from_the_record_alone(
    tiny_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    record, out = tiny_run
    summary = (out / "RESULTS.md").read_text()
    source = (BENCH / "RESULTS.md").read_text()
    assert summary.count(gpu_report.BEGIN) == summary.count(gpu_report.END) == 1
    assert summary.split(gpu_report.BEGIN)[0] == source.split(gpu_report.BEGIN)[0]
    block = summary.split(gpu_report.BEGIN)[1]
    assert "not GPU numbers" in block
    assert "Pending" not in block
    assert block.count("\n| ") == 1 + len(record["parts"])  # the header and a row per part
    for name in ("RESULTS_explain.md", "RESULTS_tracing.md"):
        text = (out / name).read_text()
        assert text.startswith((BENCH / name).read_text().rstrip("\n"))
        assert "GPU suite plumbing check: tiny shapes" in text
        assert "(fewer than 5)" in text
    assert not (out / "RESULTS_model.md").exists()
    again = tmp_path / "again"
    again.mkdir()
    gpu_report.write(
        json.loads((out / "gpu_suite.json").read_text()), BENCH, again, gpu_suite.PARTS_REPORT
    )
    for path in again.iterdir():
        assert path.read_text() == (out / path.name).read_text()


@slow
def test_compile_part_restores_the_unet_even_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpu_parts

    args, _ = gpu_suite.parse_args(["--tiny", "--out", str(tmp_path), "--repeats", "1"])
    suite = gpu_suite.Suite(args, [])
    eager = suite.model("sd15").unet
    compile_part = next(p for p in gpu_suite.PARTS if p.name == "rise_compile")
    gpu_suite.run_part(suite, compile_part, 20.0)
    assert suite.record["parts"]["rise_compile"]["status"] == "ok"
    assert suite.record["parts"]["rise_compile"]["backend"] == "none"
    assert suite.model("sd15").unet is eager

    def fail(*_args: Any) -> None:
        assert type(suite.model("sd15").unet).__name__ == "OptimizedModule"
        raise RuntimeError("boom inside the compiled run")

    monkeypatch.setattr(gpu_parts, "measure_rise", fail)
    pipe = suite.model("sd15")
    gpu_suite.run_part(suite, compile_part, 20.0)
    assert suite.record["parts"]["rise_compile"]["status"] == "error"
    assert pipe.unet is eager


@slow
def test_profile_always_keeps_the_top_ten(tmp_path: Path) -> None:
    argv = ["--tiny", "--out", str(tmp_path), "--only", "tracing_sd15,dit_flux", "--repeats", "1"]
    record = gpu_suite.main([*argv, "--profile", "always"])
    dit = record["parts"]["dit_flux"]["profile"]
    tracing = record["parts"]["tracing_sd15"]["profiles"]
    assert set(tracing) == {"plain", "trace", "trace_all_tokens", "trace_previews"}
    assert record["parts"]["tracing_sd15"]["profile_steps"] == 2
    for profile in (dit, dit["by_memory"], *tracing.values()):
        assert 0 < len(profile["top"]) <= 10
        assert profile["ranked_by"] == "self_cpu_time_total"
        shares = [row["share"] for row in profile["top"]]
        assert shares == sorted(shares, reverse=True)
        assert 0 < sum(shares) <= 1 + 1e-9
        assert "Self CPU" in profile["table"]


# ==================================================================== plumbing, no models
def test_a_failing_part_is_recorded_on_disk_before_the_next_part_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(suite: Any, rec: dict[str, Any]) -> None:
        rec["measured"] = 1.0
        raise ValueError("boom")

    def look(suite: Any, rec: dict[str, Any]) -> None:
        on_disk = json.loads((tmp_path / "gpu_suite.json").read_text())
        rec["seen"] = on_disk["parts"]["rise"]

    fake_suite(
        monkeypatch,
        [Part("rise", boom, "RESULTS_explain.md"), Part("cam_sd15", look, "RESULTS_explain.md")],
    )
    record = gpu_suite.main(["--tiny", "--out", str(tmp_path)])
    seen = record["parts"]["cam_sd15"]["seen"]
    assert seen["status"] == "error"
    assert seen["error"] == "ValueError: boom"
    assert seen["measured"] == 1.0
    assert 'raise ValueError("boom")' in seen["traceback"]
    assert record["parts"]["cam_sd15"]["status"] == "ok"
    explain = (tmp_path / "RESULTS_explain.md").read_text()
    assert "- **error**: ValueError: boom" in explain
    summary = (tmp_path / "RESULTS.md").read_text()
    assert "| rise | `rise` | error: ValueError: boom | — | not measured |" in summary


def test_a_part_past_its_hard_limit_is_stopped_and_the_suite_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forever(suite: Any, rec: dict[str, Any]) -> None:
        while True:
            time.sleep(0.01)

    before = signal.getsignal(signal.SIGALRM)
    fake_suite(
        monkeypatch,
        [
            Part("rise", forever, "RESULTS_explain.md"),
            Part("cam_sd15", lambda suite, rec: None, "RESULTS_explain.md"),
        ],
    )
    record = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--part-budget", "rise=0.4"])
    rise = record["parts"]["rise"]
    assert rise["status"] == "timeout"
    assert 0.4 * gpu_suite.HARD_FACTOR <= rise["part_s"] < 2.0
    assert record["parts"]["cam_sd15"]["status"] == "ok"
    assert signal.getsignal(signal.SIGALRM) is before


def test_repeats_stop_before_the_budget_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_rounds(suite: Any, rec: dict[str, Any]) -> None:
        rec["rounds"] = 0
        for _ in benchlib.rounds(100, suite.left):
            time.sleep(0.1)
            rec["rounds"] += 1

    fake_suite(monkeypatch, [Part("rise", slow_rounds, "RESULTS_explain.md")])
    record = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--part-budget", "rise=1"])
    assert record["parts"]["rise"]["status"] == "ok"
    assert 3 <= record["parts"]["rise"]["rounds"] <= 10


def test_rounds_stop_when_the_longest_round_no_longer_fits() -> None:
    left = iter([10.0, 10.0, 0.0, 10.0])
    done = []
    for i in benchlib.rounds(6, lambda: next(left)):
        time.sleep(0.01)
        done.append(i)
    assert done == [0, 1, 2]  # asked before rounds 1, 2 and 3; 3 did not fit
    assert list(benchlib.rounds(3)) == [0, 1, 2]


def test_parts_that_no_longer_fit_the_suite_budget_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_suite(
        monkeypatch,
        [
            Part("rise", lambda suite, rec: time.sleep(0.9), "RESULTS_explain.md"),
            Part("cam_sd15", lambda suite, rec: None, "RESULTS_explain.md"),
        ],
    )
    budgets = ["--part-budget", "rise=1", "--part-budget", "cam_sd15=0.8"]
    record = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--budget-s", "1", *budgets])
    assert record["parts"]["rise"]["status"] == "ok"
    # 0.1 s left of the suite's budget is under a quarter of cam_sd15's 0.8 s.
    assert record["parts"]["cam_sd15"]["status"] == "skipped"
    assert "out of the suite's time budget" in record["parts"]["cam_sd15"]["note"]


# ==================================================================== the training part
FAKE_TRAIN = """
import argparse, pathlib, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
{device}
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--exit", type=int, default=0)
args = parser.parse_args()
out = pathlib.Path(args.out)
(out / "model.safetensors").write_bytes(b"weights")
print("training on", getattr(args, "device", None), flush=True)
time.sleep(args.sleep)
sys.exit(args.exit)
"""


def train_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: bool) -> str:
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    line = 'parser.add_argument("--device", required=True)' if device else ""
    name = "fake_train_device" if device else "fake_train_plain"
    (folder / f"{name}.py").write_text(FAKE_TRAIN.format(device=line))
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return name


def test_train_is_skipped_when_the_recipe_takes_no_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = train_module(tmp_path, monkeypatch, device=False)
    out = tmp_path / "out"
    record = gpu_suite.main(
        ["--tiny", "--out", str(out), "--only", "train", "--train-module", module]
    )
    train = record["parts"]["train"]
    assert train["status"] == "skipped"
    assert "no --device option" in train["note"]
    assert "### `train`: skipped" in (out / "RESULTS_model.md").read_text()


def test_train_is_stopped_at_its_cap_and_its_weights_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = train_module(tmp_path, monkeypatch, device=True)
    out = tmp_path / "out"
    record = gpu_suite.main(
        [
            "--tiny",
            "--out",
            str(out),
            "--only",
            "train",
            "--train-module",
            module,
            "--train-args",
            "--sleep 60",
            "--part-budget",
            "train=3",
        ]
    )
    train = record["parts"]["train"]
    assert train["status"] == "ok"
    assert train["stopped_at_cap"] is True
    assert train["seconds"] < 3 * gpu_suite.HARD_FACTOR
    assert "training on cpu" in train["log_tail"]
    assert (out / train["weights_file"]).read_bytes() == b"weights"
    assert "stopped at the part's time cap" in (out / "RESULTS_model.md").read_text()


def test_a_failing_training_command_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = train_module(tmp_path, monkeypatch, device=True)
    record = gpu_suite.main(
        [
            "--tiny",
            "--out",
            str(tmp_path / "out"),
            "--only",
            "train",
            "--train-module",
            module,
            "--train-args",
            "--exit 3",
        ]
    )
    train = record["parts"]["train"]
    assert train["status"] == "error"
    assert "exited with 3" in train["error"]


# ==================================================================== command line
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tiny", "--out", "x", "--only", "rise,nope"], "unknown parts ['nope']"),
        (["--tiny", "--out", "x", "--part-budget", "nope=3"], "--part-budget takes PART=SECONDS"),
        (["--tiny"], "pass --out DIR"),
        (["--out", "x", "--device", "cpu"], "pass --tiny"),
        (["--tiny", "--out", "x", "--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_arguments_say_how_to_fix_them(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit):
        gpu_suite.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message of a machine without CUDA"
)
def test_cuda_is_refused_where_there_is_none(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", "x"])
    assert "no CUDA device here" in capsys.readouterr().err


def test_train_runs_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    def train_line(argv: list[str]) -> str:
        gpu_suite.main(["--list", "--tiny", *argv])
        return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train "))

    assert train_line([]).endswith("(not chosen)")
    assert not train_line(["--train"]).endswith("(not chosen)")
    assert not train_line(["--only", "train"]).endswith("(not chosen)")


def test_the_pending_section_gives_the_command_the_wheel_script_prints() -> None:
    printed = subprocess.run(
        ["bash", str(BENCH / "gpu_wheels.sh"), "--print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    command = next(line for line in printed.splitlines() if line.startswith("python3 -m pip"))
    timeout = printed.split("timeout_s ")[1].split(",")[0]
    pending = (BENCH / "RESULTS.md").read_text().split(gpu_report.BEGIN)[1]
    assert f"\n{command}\n" in pending
    assert f"`timeout_s: {timeout}`" in pending
    assert f"--budget-s {int(gpu_suite.FULL.budget_s)}" in command
