"""The embedded UNet's forward-only calls through onnxruntime against torch, beside the FLOP floor.

Two workloads whose forward passes need no gradients, so the exported graph could run them:

``--calls rise`` (default)
    DF-RISE at one step: ``n_masks`` CFG calls of the denoiser on masked latents, i.e. the
    UNet on ``2 * n_masks`` rows at one timestep, in chunks as DF-RISE batches them.
``--calls switch``
    The denoiser calls of one prompt-switch curve (``bench_interventions.py speed``): 20
    switch points x 4 seeds over 20 steps, so at step ``j`` one call on ``(j + 1) * 4`` CFG
    pairs (``2 * 4 * (j + 1)`` rows), 840 pairs in all.

Each is run by torch eager and by onnxruntime on a dynamic-batch export of the same UNet
(float16 storage, float32 compute), alternating, beside the FLOP floor of the same rows
(``FlopCounterMode`` FLOPs divided by a large matmul's rate, as ``bench_rise.py``).

Usage::

    python bench/bench_onnx_rise.py --masks 500 --repeats 3
    python bench/bench_onnx_rise.py --calls switch --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rise import count_flops, gemm_rate
from benchlib import machine

from diffwidget.models.live_graphs import OPSET, store_float16
from diffwidget.models.loader import load_demo_pipeline

CHUNK = 250


def export_dynamic(unet: Any, path: Path) -> None:
    """The UNet alone with a dynamic batch axis."""

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: Any, t: Any, e: Any) -> Any:
            return self.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]

    batch = torch.export.Dim("batch", min=1, max=4096)
    size = int(unet.config.sample_size)
    args = (torch.randn(8, 4, size, size), torch.tensor([500.0]), torch.randn(8, 16, 64))
    with torch.no_grad():
        program = torch.onnx.export(
            Graph().eval(),
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=["x", "t", "e"],
            dynamic_shapes=({0: batch}, None, {0: batch}),
        )
    program.save(str(path))
    store_float16(path)


#: The switch curve of ``bench_interventions.py speed``: switch points, seeds, steps.
SWITCH_POINTS, SWITCH_SEEDS = 20, 4


def call_sizes(calls: str, masks: int) -> list[int]:
    """Rows (both CFG halves) of each denoiser call of the workload."""
    if calls == "switch":
        return [2 * SWITCH_SEEDS * (j + 1) for j in range(SWITCH_POINTS)]
    rows = 2 * masks
    return [min(CHUNK, rows - i) for i in range(0, rows, CHUNK)]


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", choices=["rise", "switch"], default="rise")
    parser.add_argument("--masks", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unet = load_demo_pipeline().unet.eval()
    sizes = call_sizes(args.calls, args.masks)
    rows, largest = sum(sizes), max(sizes)
    size = int(unet.config.sample_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(largest, 4, size, size, generator=gen)
    e = torch.randn(largest, 16, 64, generator=gen)
    t = torch.tensor([500.0])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet_dynamic.onnx"
        export_dynamic(unet, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            want = unet(x, t, encoder_hidden_states=e).sample.numpy()
        got = session.run(None, {"x": x.numpy(), "t": t.numpy(), "e": e.numpy()})
        max_diff = float(np.abs(got[0] - want).max())

        def run_torch() -> None:
            with torch.no_grad():
                for n in sizes:
                    unet(x[:n], t, encoder_hidden_states=e[:n])

        def run_ort() -> None:
            for n in sizes:
                session.run(None, {"x": x[:n].numpy(), "t": t.numpy(), "e": e[:n].numpy()})

        flops, _ = count_flops(lambda: unet(x, t, encoder_hidden_states=e))
        flops = flops * rows / largest
        times: dict[str, list[float]] = {"torch eager": [], "onnxruntime": [], "floor": []}
        for _ in range(args.repeats):
            for name, fn in (("torch eager", run_torch), ("onnxruntime", run_ort)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            rate, _cpu_rate = gemm_rate(torch.device("cpu"), torch.float32)
            times["floor"].append(flops / rate)
    median = {k: statistics.median(v) for k, v in times.items()}
    what = "DF-RISE" if args.calls == "rise" else "one switch curve"
    print(
        f"machine: {machine('cpu').get('cpu')}, one thread, load {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(f"UNet rows {rows} in {len(sizes)} calls ({what}), {flops / 1e9:.1f} GFLOP")
    print(f"onnxruntime vs torch max |diff| on {largest} rows: {max_diff:.2e}")
    print(f"| denoiser calls of {what} | s (median of {args.repeats}) | × FLOP floor |")
    print("|---|---|---|")
    for name in ("torch eager", "onnxruntime", "floor"):
        print(f"| {name} | {median[name]:.2f} | {median[name] / median['floor']:.2f} |")
    print("runs (s): " + "; ".join(f"{k} {[round(v, 2) for v in vs]}" for k, vs in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
