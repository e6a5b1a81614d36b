"""Export an embedded pipeline's graphs to ONNX for the browser (build time only).

The UNet's four graphs are described here; the DiT's (joint text embeddings, the MMDiT
with its joint-attention text shares, the same decoders) in :mod:`.live_export_dit`.
Each is run by onnxruntime (Python in the tests, onnxruntime-web in the page):

* ``text_encoder``: token ids ``[2, L]`` (``[uncond, cond]``) -> embeddings ``[2, L, D]``;
* ``unet``: ``sample [2, C, h, w]``, ``timestep [1]`` (float32), ``text [2, L, D]`` ->
  ``model_output [2, C, h, w]`` and, per cross-attention layer, the conditional half's
  softmax over the text keys, mean over heads, ``[n_queries, L]``;
* ``preview``: the shipped tiny preview decoder, latent ``[1, C, h, w]`` (the denoiser's
  scale) -> uint8 image ``[1, H, W, 3]``;
* ``vae``: the VAE decoder, same signature.

The decoders include the pipeline's post-processing (``/ scaling_factor + shift_factor``,
``[-1, 1] -> [0, 1]``, clipping, ``* 255`` rounded half to even as NumPy does), so their
output is exactly what :func:`diffwidget.tracing.decode.to_uint8` stores. Attention is
written out as an explicit softmax (every attention layer of the UNet, so its output goes
through the same arithmetic as the recorded probabilities); the other layers are diffusers'
own modules. Weights are stored float16 (the shipped weights are float16, so this is
lossless) and cast to float32 when a session loads the graph; any other constant, such as
the timestep frequency table, stays float32.

Run ``python -m diffwidget.models.live_export [--model dit]`` after the shipped weights
change; a test fails while the manifest's fingerprint differs from the weights'. Needs
``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``[live-export]`` extra); users never
export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffwidget.models.live_manifest import (
    DPM_SOLVER,
    FLOW_MATCH_EULER,
    LIVE_FORMAT,
    LIVE_MODELS,
    MANIFEST_FILE,
    WORDS_PLACEHOLDER,
    AttentionOutput,
    FlowMatchFacts,
    GraphFile,
    LiveManifest,
    SchedulerFacts,
    TokenizerFacts,
    file_sha256,
    live_folder,
    weights_fingerprint,
)

#: ONNX opset of the export (every op of it runs in onnxruntime-web's wasm build).
OPSET = 20
#: Rows of the UNet call: the pipeline batches classifier-free guidance as [uncond, cond].
CFG_HALVES = ("uncond", "cond")
COND_ROW = CFG_HALVES.index("cond")
#: Name under which the preview decoder's graph records its maker (``Trace.facts.preview_decoder``).
PREVIEW_DECODER_NAME = "shipped demo decoder"
#: Output name prefix of the attention probabilities.
ATTENTION_PREFIX = "attention:"
_UINT8_MAX = 255.0
_HEX_WORDS = "\x00words\x00"
#: A word count no message holds otherwise, replaced by a placeholder in the template.
_N_WORDS = 987654321


def _torch() -> Any:
    import torch

    return torch


class ExportAttnProcessor:
    """Attention written out (softmax(Q Kᵀ · scale) V) so its probabilities can be returned.

    Mirrors diffusers' ``AttnProcessor2_0`` for the layers of the embedded UNet (no spatial
    or group norm, no masks); for cross-attention layers it appends the conditional half's
    probabilities, mean over heads, to ``store``.
    """

    def __init__(self, store: dict[str, Any] | None, layer: str = "") -> None:
        self.store = store
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        temb: Any = None,
        **_: Any,
    ) -> Any:
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm:
            raise ValueError(
                "the live export handles attention without masks or spatial/group norms "
                "(the embedded UNet's); this layer has one"
            )
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: Any) -> Any:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        # Scores as the trace's capture computes them: Q @ (K * scale)^T, in float32.
        probs = (query @ (key * attn.scale).transpose(-1, -2)).softmax(dim=-1)
        if self.store is not None:
            self.store[self.layer] = probs[COND_ROW].mean(dim=0)
        out = (probs @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _unet_graph(unet: Any, layers: list[str]) -> Any:
    import torch

    class UNetGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet
            self.store: dict[str, Any] = {}
            processors = {}
            for name in unet.attn_processors:
                layer = name.removesuffix(".processor")
                processors[name] = ExportAttnProcessor(
                    self.store if layer in layers else None, layer
                )
            unet.set_attn_processor(dict(processors))  # set_attn_processor empties its argument

        def forward(self, sample: Any, timestep: Any, text: Any) -> tuple[Any, ...]:
            self.store.clear()
            out = self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]
            if sorted(self.store) != sorted(layers):
                raise RuntimeError(f"attention maps of {sorted(self.store)}, expected {layers}")
            return (out, *(self.store[name] for name in layers))

    return UNetGraph().eval()


def _decoder_graph(decoder: Any, scaling: float, shift: float) -> Any:
    import torch

    class DecoderGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, latent: Any) -> Any:
            image = self.decoder.decode(latent / scaling + shift, return_dict=False)[0]
            # The pipeline's image processor, then diffwidget's to_uint8 (round half to even).
            image = (image / 2 + 0.5).clamp(0, 1)
            image = torch.round(image * _UINT8_MAX).to(torch.uint8)
            return image.permute(0, 2, 3, 1)

    return DecoderGraph().eval()


def _text_graph(text_encoder: Any) -> Any:
    import torch

    class TextGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids: Any) -> Any:
            return self.text_encoder(input_ids, return_dict=False)[0]

    return TextGraph().eval()


def store_float16(path: Path) -> None:
    """Store every float32 constant that float16 holds exactly as float16, cast on load.

    The shipped weights are float16, so their (possibly transposed or reshaped) copies are
    exactly representable; computed constants such as the timestep frequency table are not,
    and stay float32.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        with np.errstate(over="ignore"):  # out-of-range constants (mask fills) stay float32
            half = values.astype(np.float16)
        if values.size < 2 or not np.array_equal(half.astype(np.float32), values):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name=f"{name}__f16"))
        casts.append(helper.make_node("Cast", [f"{name}__f16"], [name], to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    # The exporter annotates every node with its Python stack and module path: a third of
    # the file, and of no use to a runtime.
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.value_info[:]
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _export(module: Any, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str]):
    torch = _torch()
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            verbose=False,
        )
    program.save(str(path))
    store_float16(path)


def tokenizer_facts(tokenizer: Any) -> TokenizerFacts:
    """The vocabulary, merges and messages the JavaScript tokenizer reads."""
    from diffwidget.models.prompts import MAX_WORDS, too_long_message, unknown_words_message
    from diffwidget.models.scenes import VOCABULARY
    from diffwidget.models.tokenizer import SPELLINGS, WORD_END

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    unknown = unknown_words_message([_HEX_WORDS]).replace(repr(_HEX_WORDS), WORDS_PLACEHOLDER)
    too_long = too_long_message(_N_WORDS).replace(str(_N_WORDS), "{n}")
    return TokenizerFacts(
        vocab={str(k): int(v) for k, v in model["vocab"].items()},
        merges=tuple(merges),
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
        unk_id=int(tokenizer.unk_token_id),
        max_length=int(tokenizer.model_max_length),
        word_end=WORD_END,
        spellings=dict(SPELLINGS),
        known_words=tuple(VOCABULARY),
        max_words=MAX_WORDS,
        unknown_words_template=unknown,
        too_long_template=too_long,
    )


def scheduler_facts(scheduler: Any) -> SchedulerFacts | FlowMatchFacts:
    """The scheduler's class and the config entries the JavaScript port implements."""
    name = type(scheduler).__name__
    kind = {DPM_SOLVER: SchedulerFacts, FLOW_MATCH_EULER: FlowMatchFacts}.get(name)
    if kind is None:
        raise ValueError(
            f"the browser runtime ports {DPM_SOLVER} and {FLOW_MATCH_EULER}, not {name}"
        )
    config = dict(scheduler.config)
    names = [f.name for f in dataclasses.fields(kind) if f.name != "class_name"]
    return kind(class_name=name, **{f: config[f] for f in names})


@dataclass
class ExportPlan:
    """What one model's export consists of: its graphs and the model facts of its manifest."""

    #: (graph name, module, example inputs, input names, output names), in manifest order.
    specs: list[tuple[str, Any, tuple[Any, ...], list[str], list[str]]]
    attention: list[AttentionOutput]
    latent_channels: int
    latent_size: int
    image_size: int
    text_tail: int
    attention_normalisation: str


def decoder_specs(pipe: Any, channels: int, size: int) -> list[Any]:
    """The shipped preview decoder and the pipeline's VAE decoder, each with post-processing."""
    torch = _torch()
    from diffwidget.models.preview_decoder import SHIPPED, load_preview_decoder

    vae = pipe.vae
    preview = load_preview_decoder(SHIPPED["demo"]).to(memory_format=torch.contiguous_format)
    latent = (torch.randn(1, channels, size, size),)
    return [
        (
            "preview",
            _decoder_graph(
                preview,
                float(preview.config.scaling_factor or 1.0),
                float(preview.config.shift_factor or 0.0),
            ),
            latent,
            ["latent"],
            ["image"],
        ),
        (
            "vae",
            _decoder_graph(
                vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
            ),
            latent,
            ["latent"],
            ["image"],
        ),
    ]


def _unet_plan(pipe: Any) -> ExportPlan:
    torch = _torch()
    unet, vae = pipe.unet, pipe.vae
    layers = _cross_attention_layers(unet)
    grids = _layer_grids(unet, layers)
    channels = int(unet.config.in_channels)
    size = int(unet.config.sample_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    length = int(pipe.tokenizer.model_max_length)
    width = int(pipe.text_encoder.config.hidden_size)
    attention = [
        AttentionOutput(layer=name, grid=grids[name], output=ATTENTION_PREFIX + name)
        for name in layers
    ]
    specs: list[tuple[str, Any, tuple[Any, ...], list[str], list[str]]] = [
        (
            "text_encoder",
            _text_graph(pipe.text_encoder),
            (torch.zeros(len(CFG_HALVES), length, dtype=torch.int64),),
            ["input_ids"],
            ["text"],
        ),
        (
            "unet",
            _unet_graph(unet, layers),
            (
                torch.randn(len(CFG_HALVES), channels, size, size),
                torch.tensor([999.0]),
                torch.randn(len(CFG_HALVES), length, width),
            ),
            ["sample", "timestep", "text"],
            ["model_output", *(a.output for a in attention)],
        ),
        *decoder_specs(pipe, channels, size),
    ]
    return ExportPlan(specs, attention, channels, size, size * factor, 0, "text_softmax")


def export_live(model: str = "unet", dest: str | Path | None = None) -> LiveManifest:
    """Export ``model``'s graphs and manifest into ``dest`` (the package's folder by default).

    Parameters
    ----------
    model : {"unet", "dit"}
        The embedded model to export.
    dest : str or Path, optional
        Target folder, replaced as a whole; ``diffwidget/models/live/<model>`` by default.

    Returns
    -------
    LiveManifest
        The manifest written beside the graphs.

    Examples
    --------
    >>> manifest = export_live("dit", tempfile.mkdtemp())  # doctest: +SKIP
    >>> [g.name for g in manifest.graphs]  # doctest: +SKIP
    ['text_encoder', 'transformer', 'preview', 'vae']
    """
    if model not in LIVE_MODELS:
        raise ValueError(f"the live export covers {LIVE_MODELS}, not {model!r}")
    from diffwidget.models.live_export_dit import dit_plan
    from diffwidget.models.loader import DEFAULT_STEPS, RECOMMENDED_GUIDANCE, load_demo_pipeline

    pipe = load_demo_pipeline(model)  # type: ignore[arg-type]
    plan = _unet_plan(pipe) if model == "unet" else dit_plan(pipe)
    dest = Path(dest) if dest is not None else live_folder(model)
    with tempfile.TemporaryDirectory(prefix="diffwidget-live-") as tmp:
        graphs = []
        for name, module, args, inputs, outputs in plan.specs:
            path = Path(tmp) / f"{name}.onnx"
            _export(module, args, path, inputs, outputs)
            graphs.append(
                GraphFile(
                    name=name,  # type: ignore[arg-type]
                    file=path.name,
                    sha256=file_sha256(path),
                    bytes=path.stat().st_size,
                    inputs=tuple(inputs),
                    outputs=tuple(outputs),
                )
            )
        size = plan.latent_size
        manifest = LiveManifest(
            format_version=LIVE_FORMAT,
            model=model,  # type: ignore[arg-type]
            graphs=tuple(graphs),
            attention=tuple(plan.attention),
            latent_channels=plan.latent_channels,
            latent_hw=(size, size),
            image_hw=(plan.image_size, plan.image_size),
            cfg_halves=CFG_HALVES,
            scheduler=scheduler_facts(pipe.scheduler),
            tokenizer=tokenizer_facts(pipe.tokenizer),
            text_tail=plan.text_tail,
            attention_normalisation=plan.attention_normalisation,
            default_steps=DEFAULT_STEPS,
            default_guidance=RECOMMENDED_GUIDANCE[model],
            max_steps=pipe.scheduler.config.num_train_timesteps,
            preview_decoder=PREVIEW_DECODER_NAME,
            fingerprint=weights_fingerprint(model),
            opset=OPSET,
            versions=_versions(),
        )
        manifest.save(tmp)
        LiveManifest.load(Path(tmp) / MANIFEST_FILE).check_files(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(tmp, dest)
        dest.chmod(0o755)  # the temporary folder's owner-only mode was copied with it
    return manifest


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _cross_attention_layers(unet: Any) -> list[str]:
    """``attn2`` paths in data-flow order (down, mid, up), as the trace records them."""
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    names = [
        name
        for name, module in unet.named_modules()
        if name.endswith(".attn2") and getattr(module, "is_cross_attention", False)
    ]
    return sorted(
        names,
        key=lambda p: (order[p.split(".")[0]], [int(x) for x in p.split(".") if x.isdigit()]),
    )


def _layer_grids(unet: Any, layers: list[str]) -> dict[str, tuple[int, int]]:
    """Each layer's spatial grid, read from one forward pass's query counts."""
    torch = _torch()
    grids: dict[str, tuple[int, int]] = {}
    modules = dict(unet.named_modules())
    handles = []
    for name in layers:

        def hook(_module: Any, args: tuple[Any, ...], name: str = name) -> None:
            n = int(args[0].shape[1])
            side = math.isqrt(n)
            if side * side != n:  # the embedded model's latents are square
                raise ValueError(f"{name} has {n} queries, not a square grid")
            grids[name] = (side, side)

        handles.append(modules[name].register_forward_pre_hook(hook))
    size = int(unet.config.sample_size)
    try:
        with torch.no_grad():
            unet(
                torch.zeros(1, unet.config.in_channels, size, size),
                torch.tensor([1.0]),
                encoder_hidden_states=torch.zeros(1, 1, unet.config.cross_attention_dim),
            )
    finally:
        for handle in handles:
            handle.remove()
    return grids


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: export the live graphs into the package."""
    parser = argparse.ArgumentParser(description="Export the embedded model's ONNX graphs.")
    parser.add_argument("--model", default="unet", choices=list(LIVE_MODELS))
    parser.add_argument("--dest", default=None, help="target folder (default: the package's)")
    args = parser.parse_args(argv)
    manifest = export_live(args.model, args.dest)
    total = sum(g.bytes for g in manifest.graphs)
    print(f"exported {len(manifest.graphs)} graphs ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
