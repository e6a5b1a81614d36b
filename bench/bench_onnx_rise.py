"""DF-RISE's mask batches through onnxruntime against torch, beside the FLOP floor, one thread.

DF-RISE at one step is ``n_masks`` CFG calls of the denoiser on masked latents; its forward
passes need no gradients, so the exported graph could run them. This measures the part that
dominates: the embedded UNet on ``2 * n_masks`` rows (both CFG halves) at one timestep, in
chunks as DF-RISE batches them, by torch eager and by onnxruntime on a dynamic-batch export of
the same UNet (float16 storage, float32 compute), alternating; and the FLOP floor of the same
rows (``FlopCounterMode`` FLOPs divided by a large matmul's rate, as ``bench_rise.py``).

Usage::

    python bench/bench_onnx_rise.py --masks 500 --repeats 3
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


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--masks", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unet = load_demo_pipeline().unet.eval()
    rows = 2 * args.masks
    size = int(unet.config.sample_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, size, size, generator=gen)
    e = torch.randn(rows, 16, 64, generator=gen)
    t = torch.tensor([500.0])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet_dynamic.onnx"
        export_dynamic(unet, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            want = unet(x[:CHUNK], t, encoder_hidden_states=e[:CHUNK]).sample.numpy()
        got = session.run(None, {"x": x[:CHUNK].numpy(), "t": t.numpy(), "e": e[:CHUNK].numpy()})
        max_diff = float(np.abs(got[0] - want).max())

        def run_torch() -> None:
            with torch.no_grad():
                for i in range(0, rows, CHUNK):
                    unet(x[i : i + CHUNK], t, encoder_hidden_states=e[i : i + CHUNK])

        def run_ort() -> None:
            for i in range(0, rows, CHUNK):
                feeds = {
                    "x": x[i : i + CHUNK].numpy(),
                    "t": t.numpy(),
                    "e": e[i : i + CHUNK].numpy(),
                }
                session.run(None, feeds)

        flops, _ = count_flops(lambda: unet(x[:CHUNK], t, encoder_hidden_states=e[:CHUNK]))
        flops = flops * rows / CHUNK
        times: dict[str, list[float]] = {"torch eager": [], "onnxruntime": [], "floor": []}
        for _ in range(args.repeats):
            for name, fn in (("torch eager", run_torch), ("onnxruntime", run_ort)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            rate, _cpu_rate = gemm_rate(torch.device("cpu"), torch.float32)
            times["floor"].append(flops / rate)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {machine('cpu').get('cpu')}, load {os.getloadavg()[0]:.1f}, one thread")
    print(f"UNet rows {rows} ({args.masks} masks x 2 CFG halves), {flops / 1e9:.1f} GFLOP")
    print(f"onnxruntime vs torch max |diff| on {CHUNK} rows: {max_diff:.2e}")
    print("| denoiser calls of DF-RISE | s (median) | × FLOP floor |")
    print("|---|---|---|")
    for name in ("torch eager", "onnxruntime", "floor"):
        print(f"| {name} | {median[name]:.2f} | {median[name] / median['floor']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
