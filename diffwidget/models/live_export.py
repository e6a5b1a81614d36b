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
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffwidget.models.live_graphs import (
    ATTENTION_PREFIX,
    CFG_HALVES,
    COND_ROW,
    OPSET,
    PREVIEW_DECODER_NAME,
    ExportPlan,
    GraphSpec,
    decoder_specs,
    export_graph,
    scheduler_facts,
    tokenizer_facts,
)
from diffwidget.models.live_manifest import (
    LIVE_FORMAT,
    LIVE_MODELS,
    MANIFEST_FILE,
    AttentionOutput,
    GraphFile,
    LiveManifest,
    file_sha256,
    is_live_model,
    live_folder,
    weights_fingerprint,
)


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


def _text_graph(text_encoder: Any) -> Any:
    import torch

    class TextGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids: Any) -> Any:
            return self.text_encoder(input_ids, return_dict=False)[0]

    return TextGraph().eval()


def _unet_plan(pipe: Any) -> ExportPlan:
    import torch

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
    specs = [
        GraphSpec(
            "text_encoder",
            _text_graph(pipe.text_encoder),
            (torch.zeros(len(CFG_HALVES), length, dtype=torch.int64),),
            ["input_ids"],
            ["text"],
        ),
        GraphSpec(
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
    if not is_live_model(model):
        raise ValueError(f"the live export covers {LIVE_MODELS}, not {model!r}")
    from diffwidget.models.live_export_dit import dit_plan
    from diffwidget.models.loader import DEFAULT_STEPS, RECOMMENDED_GUIDANCE, load_demo_pipeline

    pipe = load_demo_pipeline(model)
    plan = _unet_plan(pipe) if model == "unet" else dit_plan(pipe)
    dest = Path(dest) if dest is not None else live_folder(model)
    with tempfile.TemporaryDirectory(prefix="diffwidget-live-") as tmp:
        graphs = []
        for spec in plan.specs:
            path = Path(tmp) / f"{spec.name}.onnx"
            export_graph(spec.module, spec.example, path, spec.inputs, spec.outputs)
            graphs.append(
                GraphFile(
                    name=spec.name,
                    file=path.name,
                    sha256=file_sha256(path),
                    bytes=path.stat().st_size,
                    inputs=tuple(spec.inputs),
                    outputs=tuple(spec.outputs),
                )
            )
        size = plan.latent_size
        manifest = LiveManifest(
            format_version=LIVE_FORMAT,
            model=model,
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
    import torch

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
