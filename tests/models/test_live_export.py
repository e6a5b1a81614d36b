"""The shipped ONNX exports of the embedded UNet and DiT: current, complete, equal to the trace.

The exported graphs run through Python's onnxruntime with the pipeline's own tokenizer,
noise and scheduler (:mod:`diffwidget.tracing.live_run`); the trace of the same caption and seed
is the independent reference (torch, diffusers' processors, the capture's side computation).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import diffwidget
from diffwidget.models.live_manifest import (
    LIVE_MODELS,
    MANIFEST_FILE,
    MODEL_GRAPHS,
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


@pytest.mark.parametrize("model", LIVE_MODELS)
def test_the_export_matches_the_shipped_weights(model) -> None:
    """A stale export (weights changed, graphs not re-exported) fails here."""
    manifest = load_live_manifest(model)
    assert manifest.fingerprint == weights_fingerprint(model), (
        "the shipped weights changed since the live graphs were exported; run "
        f"`python -m diffwidget.models.live_export --model {model}`"
    )
    assert manifest.model == model
    assert sorted(g.name for g in manifest.graphs) == sorted(MODEL_GRAPHS[model])


def test_the_dit_manifest_holds_its_flow_matching_scheduler_and_joint_text() -> None:
    pipe = diffwidget.load_demo_pipeline("dit")
    manifest = load_live_manifest("dit")
    config = pipe.scheduler.config
    assert manifest.scheduler.class_name == type(pipe.scheduler).__name__
    assert manifest.scheduler.shift == config.shift
    assert manifest.scheduler.use_dynamic_shifting == config.use_dynamic_shifting
    assert manifest.scheduler.num_train_timesteps == config.num_train_timesteps
    assert manifest.text_length == 16 + 256  # CLIP's positions, then the absent T5's
    assert manifest.attention_normalisation == "joint_share"
    assert [a.layer for a in manifest.attention] == [
        f"transformer_blocks.{i}.attn" for i in range(len(pipe.transformer.transformer_blocks))
    ]


def test_an_unported_scheduler_or_a_wrong_denoiser_graph_is_refused() -> None:
    data = json.loads((live_folder("dit") / MANIFEST_FILE).read_text())
    data["scheduler"]["class_name"] = "EulerDiscreteScheduler"
    with pytest.raises(LiveManifestError, match="EulerDiscreteScheduler"):
        LiveManifest.from_json(data)
    data = json.loads((live_folder("dit") / MANIFEST_FILE).read_text())
    data["graphs"][1]["name"] = "unet"
    with pytest.raises(LiveManifestError, match="graphs must be exactly"):
        LiveManifest.from_json(data)


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
    from diffwidget.tracing.live_run import LiveGraphs

    return LiveGraphs("unet")


@pytest.fixture(scope="module")
def dit_pipe():
    return diffwidget.load_demo_pipeline("dit")


@pytest.fixture(scope="module")
def dit_graphs():
    from diffwidget.tracing.live_run import LiveGraphs

    return LiveGraphs("dit")


def test_the_dit_text_graph_builds_the_pipelines_joint_embeddings(dit_pipe, dit_graphs) -> None:
    """The reference is diffusers' own ``encode_prompt`` (two CLIPs, zero-padded T5 rows)."""
    import torch

    prompt = "a small blue square above a yellow triangle"
    length = dit_graphs.manifest.tokenizer.max_length
    ids = [
        dit_pipe.tokenizer(t, padding="max_length", max_length=length, truncation=True).input_ids
        for t in ("", prompt)
    ]
    out = dit_graphs.run("text_encoder", input_ids=np.asarray(ids, np.int64))
    with torch.no_grad():
        text, negative, pooled, negative_pooled = dit_pipe.encode_prompt(
            prompt, None, None, do_classifier_free_guidance=True
        )
    np.testing.assert_allclose(out["text"][1, :length], text[0, :length].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["text"][0, :length], negative[0, :length].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["pooled"][1], pooled[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["pooled"][0], negative_pooled[0].numpy(), atol=1e-4)
    # The pipeline's 256 all-zero T5 rows arrive as one zero row the transformer weights.
    tail = dit_graphs.manifest.text_tail
    assert text.shape[1] == length + tail
    assert torch.count_nonzero(text[:, length:]) == 0
    assert out["text"].shape[1] == length + 1
    assert np.count_nonzero(out["text"][:, length:]) == 0


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "seed"), CASES[1:])
def test_the_exported_dit_graphs_reproduce_the_trace(dit_pipe, dit_graphs, prompt, seed) -> None:
    from diffwidget.tracing.live_run import generate

    reference = diffwidget.trace(dit_pipe, prompt, seed=seed)
    run = generate(dit_graphs, dit_pipe, prompt, seed=seed, guidance_scale=reference.guidance_scale)
    _same_as_trace(run, reference, dit_graphs.manifest)
    # The joint softmax's text block: each patch's text share, below one and above zero.
    first = run.attention[next(iter(run.attention))]
    assert first.sum(-1).min() > 0
    assert first.sum(-1).max() < 1


def _same_as_trace(run, reference, manifest) -> None:
    assert np.array_equal(np.round(run.timesteps).astype(np.int64), reference.timesteps)
    assert reference.facts.attention_normalisation == manifest.attention_normalisation
    assert np.abs(run.image.astype(int) - reference.image.astype(int)).max() <= IMAGE_TOLERANCE
    assert reference.previews is not None
    diff = np.abs(run.previews.astype(int) - reference.previews.astype(int))
    assert diff.max() <= IMAGE_TOLERANCE
    assert list(reference.attention) == [a.layer for a in manifest.attention]
    keep = reference.facts.token_indices
    grids = {a.layer: a.grid for a in manifest.attention}
    for layer, maps in reference.attention.items():
        assert maps.shape[1:3] == grids[layer]
        live = run.attention[layer][..., keep]
        assert live.shape == maps.shape
        assert np.abs(live - maps.astype(np.float32)).max() <= ATTENTION_TOLERANCE, layer


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "seed"), CASES)
def test_the_exported_graphs_reproduce_the_trace(pipe, graphs, prompt, seed) -> None:
    from diffwidget.tracing.live_run import generate

    reference = diffwidget.trace(pipe, prompt, seed=seed)
    run = generate(graphs, pipe, prompt, seed=seed, guidance_scale=reference.guidance_scale)
    _same_as_trace(run, reference, graphs.manifest)
    # Probabilities over all text positions sum to one per query (a softmax, not a copy).
    first = run.attention[next(iter(run.attention))]
    np.testing.assert_allclose(first.sum(-1), 1.0, atol=1e-5)
