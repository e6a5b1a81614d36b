"""The shipped ONNX export of the embedded UNet: current, complete, and equal to the trace.

The exported graphs run through Python's onnxruntime with the pipeline's own tokenizer,
noise and scheduler (:mod:`diffwidget.testing.live`); the trace of the same caption and seed
is the independent reference (torch, diffusers' processors, the capture's side computation).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import diffwidget
from diffwidget.models.live_manifest import (
    GRAPH_NAMES,
    MANIFEST_FILE,
    LiveManifest,
    LiveManifestError,
    live_folder,
    load_live_manifest,
    weights_fingerprint,
)

ort = pytest.importorskip("onnxruntime", reason="the live export is checked with onnxruntime")

#: Images and previews are uint8: within one level of 255.
IMAGE_TOLERANCE = 1
#: Attention probabilities (the trace stores them as float16).
ATTENTION_TOLERANCE = 1e-3
CASES = [("a large red circle on the left", 0), ("a small blue square above a yellow triangle", 7)]


def test_the_export_matches_the_shipped_weights() -> None:
    """A stale export (weights changed, graphs not re-exported) fails here."""
    manifest = load_live_manifest("unet")
    assert manifest.fingerprint == weights_fingerprint("unet"), (
        "the shipped weights changed since the live graphs were exported; run "
        "`python -m diffwidget.models.live_export`"
    )
    assert sorted(g.name for g in manifest.graphs) == sorted(GRAPH_NAMES)


def test_the_manifest_records_the_onnxruntime_it_was_checked_with() -> None:
    manifest = load_live_manifest("unet")
    assert manifest.versions["onnxruntime"].split(".")[:2] == ort.__version__.split(".")[:2]
    assert manifest.opset == 20


def test_the_graphs_store_weights_in_float16_and_compute_in_float32() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(live_folder("unet") / "unet.onnx"))
    sizes: dict[int, int] = {}
    for init in model.graph.initializer:
        sizes[init.data_type] = sizes.get(init.data_type, 0) + numpy_helper.to_array(init).nbytes
    assert sizes[TensorProto.FLOAT16] > 100 * sizes.get(TensorProto.FLOAT, 0)
    # The timestep frequency table stays float32 (it is not exactly representable in float16).
    table = [
        numpy_helper.to_array(i)
        for i in model.graph.initializer
        if i.data_type == TensorProto.FLOAT and numpy_helper.to_array(i).size == 16
    ]
    assert table, "the timestep frequency table was stored in float16"
    session = ort.InferenceSession(str(live_folder("unet") / "unet.onnx"))
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}


def test_a_damaged_graph_file_is_refused(tmp_path) -> None:
    manifest = load_live_manifest("unet")
    folder = live_folder("unet")
    for graph in manifest.graphs:
        (tmp_path / graph.file).write_bytes((folder / graph.file).read_bytes())
    target = tmp_path / manifest.graph("preview").file
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(LiveManifestError, match=r"preview\.onnx differs"):
        manifest.check_files(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d["graphs"][0].update(file="../x.onnx"), "plain .onnx"),
        (lambda d: d["attention"][0].update(output="nope"), "not outputs"),
        (lambda d: d["tokenizer"].update(vocab={"a": "1"}), "vocab"),
        (lambda d: d.update(fingerprint="x"), "fingerprint"),
    ],
)
def test_a_malformed_manifest_is_refused_with_the_field(edit, message) -> None:
    data = json.loads((live_folder("unet") / MANIFEST_FILE).read_text())
    broken = copy.deepcopy(data)
    edit(broken)
    with pytest.raises(LiveManifestError, match=message):
        LiveManifest.from_json(broken)
    assert LiveManifest.from_json(data) == load_live_manifest("unet", check_files=False)


@pytest.fixture(scope="module")
def pipe():
    return diffwidget.load_demo_pipeline()


@pytest.fixture(scope="module")
def graphs():
    from diffwidget.testing.live import LiveGraphs

    return LiveGraphs("unet")


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "seed"), CASES)
def test_the_exported_graphs_reproduce_the_trace(pipe, graphs, prompt, seed) -> None:
    from diffwidget.testing.live import generate

    reference = diffwidget.trace(pipe, prompt, seed=seed)
    run = generate(graphs, pipe, prompt, seed=seed, guidance_scale=reference.guidance_scale)
    assert np.array_equal(run.timesteps, reference.timesteps)
    assert np.abs(run.image.astype(int) - reference.image.astype(int)).max() <= IMAGE_TOLERANCE
    assert reference.previews is not None
    diff = np.abs(run.previews.astype(int) - reference.previews.astype(int))
    assert diff.max() <= IMAGE_TOLERANCE
    assert list(reference.attention) == [a.layer for a in graphs.manifest.attention]
    keep = reference.facts.token_indices
    grids = {a.layer: a.grid for a in graphs.manifest.attention}
    for layer, maps in reference.attention.items():
        assert maps.shape[1:3] == grids[layer]
        live = run.attention[layer][..., keep]
        assert live.shape == maps.shape
        assert np.abs(live - maps.astype(np.float32)).max() <= ATTENTION_TOLERANCE, layer
    # Probabilities over all text positions sum to one per query (a softmax, not a copy).
    first = run.attention[next(iter(run.attention))]
    np.testing.assert_allclose(first.sum(-1), 1.0, atol=1e-5)
