"""What the browser needs to run an embedded model: the exported graphs' manifest (no torch).

:mod:`diffwidget.models.live_export` exports an embedded pipeline's graphs (the UNet's or the
DiT's) to ONNX at build time and writes them, with ``manifest.json``, into
``diffwidget/models/live/<model>/`` (shipped in the wheel; users never export). The manifest
is the one record the JavaScript runtime reads: the graph files and their outputs, the
attention layers and their grids, the scheduler's configuration (DPM-Solver++ for the UNet,
flow-matching Euler for the DiT: the runtime picks its sampler from it), the text positions
the denoiser reads, the tokenizer's vocabulary, merges and normalisation, the unknown-word
message, the sampling defaults, a fingerprint of the weights the graphs were exported from
(a stale export fails a test) and the versions that made and checked it.

Examples
--------
>>> manifest = LiveManifest.load(LIVE_DIR / "unet" / MANIFEST_FILE)
>>> manifest.model, manifest.latent_hw
('unet', (16, 16))
>>> manifest.fingerprint == weights_fingerprint("unet")
True
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard, get_args

#: Folder of the exported graphs, one sub-folder per embedded model.
LIVE_DIR = Path(__file__).resolve().parent / "live"
MANIFEST_FILE = "manifest.json"
#: Version of the manifest's layout; the JavaScript runtime refuses other versions.
LIVE_FORMAT = 1
GraphName = Literal["text_encoder", "unet", "transformer", "preview", "vae"]
GRAPH_NAMES: tuple[str, ...] = get_args(GraphName)
LiveModel = Literal["unet", "dit"]
LIVE_MODELS: tuple[str, ...] = get_args(LiveModel)
#: The denoiser graph of each model, named for what it is.
DENOISER_GRAPH: dict[str, GraphName] = {"unet": "unet", "dit": "transformer"}
#: The graphs each model's export holds.
MODEL_GRAPHS: dict[str, tuple[GraphName, ...]] = {
    model: ("text_encoder", denoiser, "preview", "vae")
    for model, denoiser in DENOISER_GRAPH.items()
}
#: The two schedulers the JavaScript runtime ports.
DPM_SOLVER = "DPMSolverMultistepScheduler"
FLOW_MATCH_EULER = "FlowMatchEulerDiscreteScheduler"
#: Files whose bytes define the exported graphs: the pipeline folder's weights, configs and
#: tokenizer, and the shipped preview decoder. Relative to ``diffwidget/models``.
_FINGERPRINTED: dict[str, tuple[str, ...]] = {
    "unet": (
        "demo/model_index.json",
        "demo/scheduler/scheduler_config.json",
        "demo/text_encoder/config.json",
        "demo/text_encoder/model.safetensors",
        "demo/tokenizer/tokenizer.json",
        "demo/tokenizer/tokenizer_config.json",
        "demo/unet/config.json",
        "demo/unet/diffusion_pytorch_model.safetensors",
        "demo/vae/config.json",
        "demo/vae/diffusion_pytorch_model.safetensors",
        "preview/demo/config.json",
        "preview/demo/diffusion_pytorch_model.safetensors",
    ),
    # The DiT shares the UNet's VAE (and so its preview decoder).
    "dit": (
        "demo_dit/model_index.json",
        "demo_dit/scheduler/scheduler_config.json",
        "demo_dit/text_encoder/config.json",
        "demo_dit/text_encoder/model.safetensors",
        "demo_dit/text_encoder_2/config.json",
        "demo_dit/text_encoder_2/model.safetensors",
        "demo_dit/tokenizer/tokenizer.json",
        "demo_dit/tokenizer/tokenizer_config.json",
        "demo_dit/tokenizer_2/tokenizer.json",
        "demo_dit/tokenizer_2/tokenizer_config.json",
        "demo_dit/transformer/config.json",
        "demo_dit/transformer/diffusion_pytorch_model.safetensors",
        "demo/vae/config.json",
        "demo/vae/diffusion_pytorch_model.safetensors",
        "preview/demo/config.json",
        "preview/demo/diffusion_pytorch_model.safetensors",
    ),
}
_MODELS_DIR = Path(__file__).resolve().parent
#: Placeholder the unknown-word message template carries where the words go.
WORDS_PLACEHOLDER = "{words}"
_HEX = re.compile(r"^[0-9a-f]{64}$")
#: Largest manifest accepted (it holds a vocabulary of a few hundred entries).
MAX_MANIFEST_BYTES = 1_000_000


class LiveManifestError(ValueError):
    """A manifest that is missing, malformed or does not match its graph files."""


def weights_fingerprint(model: str = "unet") -> str:
    """SHA-256 over the shipped files an export of ``model`` is made from.

    Examples
    --------
    >>> len(weights_fingerprint("unet"))
    64
    """
    if model not in _FINGERPRINTED:
        raise ValueError(f"no live export for model {model!r}; choose {sorted(_FINGERPRINTED)}")
    digest = hashlib.sha256()
    for name in _FINGERPRINTED[model]:
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((_MODELS_DIR / name).read_bytes()).digest())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class GraphFile:
    """One exported ONNX graph: its file, checksum and named inputs and outputs."""

    name: GraphName
    file: str
    sha256: str
    bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class AttentionOutput:
    """One attention layer whose image→text probabilities the denoiser graph returns.

    ``output`` is ``[n_queries, n_text]`` float32 for the conditional CFG half (batch row 1),
    mean over heads, queries row-major on ``grid``: the softmax over the text keys (UNet
    cross-attention, ``"text_softmax"``) or the text block of the joint softmax over image
    and text keys (MMDiT, ``"joint_share"``), as :func:`diffwidget.trace` records them.
    """

    layer: str
    grid: tuple[int, int]
    output: str


@dataclass(frozen=True)
class TokenizerFacts:
    """What the JavaScript tokenizer needs to tokenize exactly as the Python one.

    The normalisation is :func:`diffwidget.models.tokenizer.caption_normalizer`'s: NFC, lower
    case, every character that is not a letter, digit or white space to a space,
    ``spellings`` replaced as whole words, runs of white space to one space. Words are then
    split into runs of letters and single digits, and each run goes through CLIP's byte-pair
    merges (``merges``, in rank order; ``word_end`` marks the end of a word).
    """

    vocab: dict[str, int]
    merges: tuple[str, ...]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    max_length: int
    word_end: str
    spellings: dict[str, str]
    known_words: tuple[str, ...]
    max_words: int
    unknown_words_template: str
    too_long_template: str


@dataclass(frozen=True)
class SchedulerFacts:
    """The UNet's scheduler (diffusers' ``DPMSolverMultistepScheduler``) and its config."""

    class_name: str
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str
    rescale_betas_zero_snr: bool
    timestep_spacing: str
    steps_offset: int
    prediction_type: str
    algorithm_type: str
    solver_order: int
    solver_type: str
    lower_order_final: bool
    euler_at_final: bool
    final_sigmas_type: str


@dataclass(frozen=True)
class FlowMatchFacts:
    """The DiT's scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler``) and its config.

    The runtime ports the static shift (``shift``); the other sigma options are recorded so
    it can refuse a model that uses them.
    """

    class_name: str
    num_train_timesteps: int
    shift: float
    use_dynamic_shifting: bool
    invert_sigmas: bool
    shift_terminal: float | None
    use_karras_sigmas: bool
    use_exponential_sigmas: bool
    use_beta_sigmas: bool
    stochastic_sampling: bool


@dataclass(frozen=True)
class LiveManifest:
    """Everything the browser runtime reads about one exported embedded model."""

    format_version: int
    model: LiveModel
    graphs: tuple[GraphFile, ...]
    attention: tuple[AttentionOutput, ...]
    latent_channels: int
    latent_hw: tuple[int, int]
    image_hw: tuple[int, int]
    #: Rows of the UNet graph's batch: ``("uncond", "cond")`` (batched CFG).
    cfg_halves: tuple[str, ...]
    scheduler: SchedulerFacts | FlowMatchFacts
    tokenizer: TokenizerFacts
    #: All-zero text positions after the tokenizer's (the DiT's absent T5; 0 for the UNet).
    #: A trace keeps the first of them (``diffwidget.tracing.tokens.empty_tokens``).
    text_tail: int
    #: How the attention outputs are normalised (``Trace.facts.attention_normalisation``).
    attention_normalisation: str
    default_steps: int
    default_guidance: float
    max_steps: int
    #: What decodes the previews (``Trace.facts.preview_decoder``).
    preview_decoder: str
    fingerprint: str
    opset: int
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def text_length(self) -> int:
        """Text positions the denoiser reads (the width of each attention output)."""
        return self.tokenizer.max_length + self.text_tail

    @property
    def denoiser(self) -> GraphFile:
        """The denoiser's graph (``unet`` or ``transformer``)."""
        return self.graph(DENOISER_GRAPH[self.model])

    def graph(self, name: str) -> GraphFile:
        """The graph called ``name``."""
        for graph in self.graphs:
            if graph.name == name:
                return graph
        raise KeyError(
            f"the manifest has no graph {name!r}; it has {[g.name for g in self.graphs]}"
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (what ``manifest.json`` holds)."""
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        """Write ``manifest.json`` into ``folder``."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Any) -> LiveManifest:
        """Validate and build a manifest from decoded JSON.

        Raises
        ------
        LiveManifestError
            Naming the first field that is missing or of the wrong kind.
        """
        try:
            return _build(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise LiveManifestError(f"invalid live manifest: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> LiveManifest:
        """Read and validate a ``manifest.json``.

        Raises
        ------
        FileNotFoundError
            When there is no manifest (the export was never run).
        LiveManifestError
            When it is malformed.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: export the live graphs with "
                "`python -m diffwidget.models.live_export`"
            )
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise LiveManifestError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        return cls.from_json(json.loads(path.read_text()))

    def check_files(self, folder: str | Path) -> None:
        """Check every graph file exists with the recorded size and checksum.

        Raises
        ------
        LiveManifestError
            Naming the file that is missing or differs.
        """
        for graph in self.graphs:
            path = Path(folder) / graph.file
            if not path.is_file():
                raise LiveManifestError(f"{path} is missing; re-export the live graphs")
            if path.stat().st_size != graph.bytes or file_sha256(path) != graph.sha256:
                raise LiveManifestError(
                    f"{path} differs from the manifest (size or SHA-256); re-export the live graphs"
                )


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _int(value: Any, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TypeError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _pair(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise TypeError(f"{what} must be a pair of integers, got {value!r}")
    return (_int(value[0], what, 1), _int(value[1], what, 1))


def _hex(value: Any, what: str) -> str:
    """A SHA-256 digest written as 64 hex digits."""
    text = _str(value, what)
    if not _HEX.match(text):
        raise ValueError(f"{what} is not 64 hex digits")
    return text


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"{what} must be a list of strings")
    return tuple(_str(v, what) for v in value)


def _str_map(value: Any, what: str, kind: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be an object")
    for key, item in value.items():
        if not isinstance(item, kind) or isinstance(item, bool):
            raise TypeError(f"{what}[{key!r}] must be a {kind.__name__}")
    return dict(value)


def _is_graph_name(name: str) -> TypeGuard[GraphName]:
    return name in GRAPH_NAMES


def is_live_model(model: str) -> TypeGuard[LiveModel]:
    """Whether ``model`` names a model with a live export (``LIVE_MODELS``).

    Examples
    --------
    >>> is_live_model("dit"), is_live_model("sdxl")
    (True, False)
    """
    return model in LIVE_MODELS


def _graph(data: Any) -> GraphFile:
    name = _str(data["name"], "graph name")
    if not _is_graph_name(name):
        raise ValueError(f"unknown graph {name!r}; expected one of {GRAPH_NAMES}")
    file = _str(data["file"], "graph file")
    if "/" in file or "\\" in file or file.startswith(".") or not file.endswith(".onnx"):
        raise ValueError(f"graph file {file!r} must be a plain .onnx file name")
    sha = _hex(data["sha256"], f"sha256 of {file}")
    return GraphFile(
        name=name,
        file=file,
        sha256=sha,
        bytes=_int(data["bytes"], "bytes", 1),
        inputs=_strs(data["inputs"], "inputs"),
        outputs=_strs(data["outputs"], "outputs"),
    )


def _build(data: Any) -> LiveManifest:
    if not isinstance(data, dict):
        raise TypeError("a manifest is a JSON object")
    version = _int(data["format_version"], "format_version", 1)
    if version != LIVE_FORMAT:
        raise ValueError(f"format_version {version} is not {LIVE_FORMAT}; re-export")
    model = _str(data["model"], "model")
    if not is_live_model(model):
        raise ValueError(f"model {model!r} is not one of {LIVE_MODELS}")
    graphs = _graphs(data["graphs"], model)
    attention = _attention(data["attention"], model, graphs)
    tokenizer = _tokenizer(data["tokenizer"])
    fingerprint = _hex(data["fingerprint"], "fingerprint")
    return LiveManifest(
        format_version=version,
        model=model,
        graphs=graphs,
        attention=attention,
        latent_channels=_int(data["latent_channels"], "latent_channels", 1),
        latent_hw=_pair(data["latent_hw"], "latent_hw"),
        image_hw=_pair(data["image_hw"], "image_hw"),
        cfg_halves=_strs(data["cfg_halves"], "cfg_halves"),
        scheduler=_scheduler(data["scheduler"]),
        tokenizer=tokenizer,
        text_tail=_int(data["text_tail"], "text_tail"),
        attention_normalisation=_str(data["attention_normalisation"], "attention_normalisation"),
        default_steps=_int(data["default_steps"], "default_steps", 1),
        default_guidance=float(data["default_guidance"]),
        max_steps=_int(data["max_steps"], "max_steps", 1),
        preview_decoder=_str(data["preview_decoder"], "preview_decoder"),
        fingerprint=fingerprint,
        opset=_int(data["opset"], "opset", 1),
        versions=_str_map(data["versions"], "versions", str),
    )


def _graphs(items: Any, model: str) -> tuple[GraphFile, ...]:
    graphs = tuple(_graph(g) for g in items)
    if sorted(g.name for g in graphs) != sorted(MODEL_GRAPHS[model]):
        raise ValueError(f"graphs must be exactly {MODEL_GRAPHS[model]}")
    return graphs


def _attention(
    items: Any, model: str, graphs: tuple[GraphFile, ...]
) -> tuple[AttentionOutput, ...]:
    attention = tuple(
        AttentionOutput(
            layer=_str(a["layer"], "attention layer"),
            grid=_pair(a["grid"], "attention grid"),
            output=_str(a["output"], "attention output"),
        )
        for a in items
    )
    denoiser = DENOISER_GRAPH[model]
    denoiser_outputs = set(next(g for g in graphs if g.name == denoiser).outputs)
    missing = [a.output for a in attention if a.output not in denoiser_outputs]
    if missing:
        raise ValueError(f"attention outputs {missing} are not outputs of the {denoiser} graph")
    return attention


def _tokenizer(tok: Any) -> TokenizerFacts:
    tokenizer = TokenizerFacts(
        vocab=_str_map(tok["vocab"], "vocab", int),
        merges=_strs(tok["merges"], "merges"),
        bos_id=_int(tok["bos_id"], "bos_id"),
        eos_id=_int(tok["eos_id"], "eos_id"),
        pad_id=_int(tok["pad_id"], "pad_id"),
        unk_id=_int(tok["unk_id"], "unk_id"),
        max_length=_int(tok["max_length"], "max_length", 2),
        word_end=_str(tok["word_end"], "word_end"),
        spellings=_str_map(tok["spellings"], "spellings", str),
        known_words=_strs(tok["known_words"], "known_words"),
        max_words=_int(tok["max_words"], "max_words", 1),
        unknown_words_template=_str(tok["unknown_words_template"], "unknown_words_template"),
        too_long_template=_str(tok["too_long_template"], "too_long_template"),
    )
    if WORDS_PLACEHOLDER not in tokenizer.unknown_words_template:
        raise ValueError(f"unknown_words_template lacks {WORDS_PLACEHOLDER}")
    return tokenizer


def _flow_match(s: Any) -> FlowMatchFacts:
    terminal = s["shift_terminal"]
    return FlowMatchFacts(
        class_name=FLOW_MATCH_EULER,
        num_train_timesteps=_int(s["num_train_timesteps"], "num_train_timesteps", 1),
        shift=float(s["shift"]),
        use_dynamic_shifting=bool(s["use_dynamic_shifting"]),
        invert_sigmas=bool(s["invert_sigmas"]),
        shift_terminal=None if terminal is None else float(terminal),
        use_karras_sigmas=bool(s["use_karras_sigmas"]),
        use_exponential_sigmas=bool(s["use_exponential_sigmas"]),
        use_beta_sigmas=bool(s["use_beta_sigmas"]),
        stochastic_sampling=bool(s["stochastic_sampling"]),
    )


def _scheduler(s: Any) -> SchedulerFacts | FlowMatchFacts:
    name = _str(s["class_name"], "scheduler class_name")
    if name == FLOW_MATCH_EULER:
        return _flow_match(s)
    if name != DPM_SOLVER:
        raise ValueError(f"scheduler {name!r} is not one of {(DPM_SOLVER, FLOW_MATCH_EULER)}")
    return SchedulerFacts(
        class_name=DPM_SOLVER,
        num_train_timesteps=_int(s["num_train_timesteps"], "num_train_timesteps", 1),
        beta_start=float(s["beta_start"]),
        beta_end=float(s["beta_end"]),
        beta_schedule=_str(s["beta_schedule"], "beta_schedule"),
        rescale_betas_zero_snr=bool(s["rescale_betas_zero_snr"]),
        timestep_spacing=_str(s["timestep_spacing"], "timestep_spacing"),
        steps_offset=_int(s["steps_offset"], "steps_offset"),
        prediction_type=_str(s["prediction_type"], "prediction_type"),
        algorithm_type=_str(s["algorithm_type"], "algorithm_type"),
        solver_order=_int(s["solver_order"], "solver_order", 1),
        solver_type=_str(s["solver_type"], "solver_type"),
        lower_order_final=bool(s["lower_order_final"]),
        euler_at_final=bool(s["euler_at_final"]),
        final_sigmas_type=_str(s["final_sigmas_type"], "final_sigmas_type"),
    )


def live_folder(model: str = "unet") -> Path:
    """The folder of ``model``'s exported graphs."""
    if model not in LIVE_MODELS:
        raise ValueError(f"no live export for model {model!r}; choose one of {LIVE_MODELS}")
    return LIVE_DIR / model


def load_live_manifest(model: str = "unet", *, check_files: bool = True) -> LiveManifest:
    """The shipped manifest of ``model``, its graph files checked.

    Examples
    --------
    >>> load_live_manifest().graph("unet").file
    'unet.onnx'
    """
    folder = live_folder(model)
    manifest = LiveManifest.load(folder / MANIFEST_FILE)
    if check_files:
        manifest.check_files(folder)
    return manifest
