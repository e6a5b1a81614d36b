"""The pieces every embedded model's browser export shares (build time only).

Constants of the exported graphs, the decoders with the pipeline's post-processing, float16
storage of the weights, the tokenizer and scheduler facts of the manifest and
:class:`ExportPlan`, what one model's export consists of. The UNet's graphs are made in
:mod:`.live_export` (which also writes the manifest), the DiT's in :mod:`.live_export_dit`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffwidget.models.live_manifest import (
    DPM_SOLVER,
    FLOW_MATCH_EULER,
    WORDS_PLACEHOLDER,
    AttentionOutput,
    FlowMatchFacts,
    GraphName,
    SchedulerFacts,
    TokenizerFacts,
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


def export_graph(
    module: Any, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str]
) -> None:
    """Export ``module`` called on ``args`` to ``path`` (opset :data:`OPSET`), weights float16."""
    import torch

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
    if program is None:  # only without dynamo=True
        raise RuntimeError(f"torch.onnx.export wrote no program for {path.name}")
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


@dataclass(frozen=True)
class GraphSpec:
    """One graph to export: its manifest name, the module, example inputs and the names of
    its inputs and outputs."""

    name: GraphName
    module: Any
    example: tuple[Any, ...]
    inputs: list[str]
    outputs: list[str]


@dataclass
class ExportPlan:
    """What one model's export consists of: its graphs and the model facts of its manifest."""

    #: The graphs, in manifest order.
    specs: list[GraphSpec]
    attention: list[AttentionOutput]
    latent_channels: int
    latent_size: int
    image_size: int
    text_tail: int
    attention_normalisation: str


def decoder_specs(pipe: Any, channels: int, size: int) -> list[GraphSpec]:
    """The shipped preview decoder and the pipeline's VAE decoder, each with post-processing."""
    import torch

    from diffwidget.models.preview_decoder import SHIPPED, load_preview_decoder

    vae = pipe.vae
    preview = load_preview_decoder(SHIPPED["demo"]).to(memory_format=torch.contiguous_format)
    latent = (torch.randn(1, channels, size, size),)
    return [
        GraphSpec(
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
        GraphSpec(
            "vae",
            _decoder_graph(
                vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
            ),
            latent,
            ["latent"],
            ["image"],
        ),
    ]
