"""Concept maps (ConceptAttention) in tracing: the definition, the image untouched, bad input.

* Every family's recorded scores equal ConceptAttention computed from its definition with
  the model's own blocks and a full masked softmax (``concept_reference``), buffered and
  inline, in both spaces.
* A toy MMDiT block whose concept outputs and maps are known in closed form.
* A traced image with concept maps is bit-identical to an untraced one, for every family.
* Hostile words, layers and modes are refused with messages that say what to do; hooks are
  gone after a run that raised.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.concept_words import (
    MAX_CONCEPT_WORDS,
    ConceptScores,
    UnknownConceptWarning,
    check_words,
)
from diffwidget.tracing.concepts import ConceptTap, replay_concepts
from diffwidget.tracing.families.base import DenoiserCall, LatentLayout
from diffwidget.tracing.families.mmdit import SD3Family
from diffwidget.tracing.generate import trace
from diffwidget.tracing.taps import LoopState, TapRegistry
from tests.tracing.concept_reference import (
    CrossReference,
    FluxReference,
    SD3Reference,
    processors,
)

WORDS = ["circle", "square", "red"]
PROMPT = "a red circle"
JOINT_CASES = ("sd3", "sd35", "flux", "pixart")
#: Relative agreement with the full-softmax reference (float32 tiny models).
RTOL = 1e-4


def _family_pipe(
    name: str,
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
    tiny_sd_pipe: Any,
) -> tuple[Any, dict[str, Any]]:
    return (tiny_sd_pipe, {}) if name == "unet" else family_case(name)


def _first_call(pipe: Any, kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of the denoiser's first call of an unguided generation."""
    from diffwidget.tracing.families import denoiser_family

    denoiser = denoiser_family(pipe).denoiser
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def clone(value: Any) -> Any:
        return value.clone() if isinstance(value, torch.Tensor) else value

    def keep(_module: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kw.items()}))

    handle = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    options = {k: v for k, v in kwargs.items() if k not in ("true_cfg_scale", "negative_prompt")}
    try:
        pipe(
            PROMPT,
            num_inference_steps=1,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **options,
        )
    finally:
        handle.remove()
    return seen[0]


def _tap_scores(
    pipe: Any, tap: ConceptTap, args: tuple[Any, ...], kw: dict[str, Any]
) -> ConceptScores:
    family = tap.family
    loop = LoopState(family, CfgLayout("none", 1.0))
    with TapRegistry([tap]).installed(loop), torch.no_grad():
        tap.on_call(family.parse_call(list(args), dict(kw)))
        family.denoiser(*args, **kw)
    return tap.result()


def _reference(
    pipe: Any, tap: ConceptTap, args: tuple[Any, ...], kw: dict[str, Any]
) -> dict[str, dict[str, torch.Tensor | None]]:
    family = tap.family
    denoiser = family.denoiser
    seen: dict[str, dict[str, torch.Tensor | None]] = {}
    kw = dict(kw)
    text = kw["encoder_hidden_states"]
    n_text, n_concepts = int(text.shape[1]), len(tap.words)
    concepts = tap.embeds.to(text.dtype)
    made: dict[str, Any] = {}
    if family.name in ("sd3", "flux"):
        kw["encoder_hidden_states"] = torch.cat([text, concepts], dim=1)
        if family.name == "flux":
            ids = kw["txt_ids"]
            kw["txt_ids"] = torch.cat([ids, torch.zeros(n_concepts, ids.shape[-1])])
        kind = SD3Reference if family.name == "sd3" else FluxReference
        made = {
            layer.path: kind(layer.path, n_text, n_concepts, seen)
            for layer in family.concept_layers()
        }
    else:
        embedder = family.concept_embedder()
        with torch.no_grad():
            projected = embedder(concepts) if embedder is not None else concepts
        made = {path: CrossReference(path, projected, seen) for path in family.attention_sites()}
    with processors(denoiser, made), torch.no_grad():
        denoiser(*args, **kw)
    return seen


def _close(ours: np.ndarray, reference: torch.Tensor) -> None:
    ref = reference[0].numpy()
    ours = ours.reshape(ref.shape)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("case", [*JOINT_CASES, "unet"])
@pytest.mark.parametrize("mode", ["buffered", "inline"])
def test_scores_follow_the_definition_computed_with_a_full_softmax(
    case: str,
    mode: str,
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
    tiny_sd_pipe: Any,
) -> None:
    pipe, kwargs = _family_pipe(case, family_case, tiny_sd_pipe)
    call = {k: v for k, v in kwargs.items() if k == "max_sequence_length"}
    args, kw = _first_call(pipe, kwargs)
    tap = ConceptTap(pipe, WORDS, spaces=("output", "attention"), call_kwargs=call, mode=mode)  # type: ignore[arg-type]
    scores = _tap_scores(pipe, tap, args, kw)
    reference = _reference(pipe, tap, args, kw)
    assert scores.layers == list(reference)
    for layer in scores.layers:
        _close(scores.layer_scores(layer, "attention")[0], reference[layer]["attention"])
        out = reference[layer]["output"]
        if out is None:  # no output projection: the output space is the attention space
            assert layer not in scores.projected
            _close(scores.layer_scores(layer, "output")[0], reference[layer]["attention"])
        else:
            assert layer in scores.projected
            _close(scores.layer_scores(layer, "output")[0], out)


def test_the_families_expose_every_kind_of_layer(
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
) -> None:
    sd35, _ = family_case("sd35")
    layers = SD3Family(sd35).concept_layers()
    # SD3.5's dual-attention block keeps its joint attention; the last block is pre-only.
    assert sd35.transformer.transformer_blocks[0].attn2 is not None
    assert [layer.has_output_projection() for layer in layers] == [True, False]
    flux, _ = family_case("flux")
    from diffwidget.tracing.families.flux import FluxFamily

    assert [layer.kind for layer in FluxFamily(flux).concept_layers()] == [
        "joint",
        "joint",
        "single",
        "single",
    ]


# ------------------------------------------------------------------ the analytic toy
class _Toy(torch.nn.Module):
    """One SD3 joint block, as a denoiser holding ``transformer_blocks``."""

    def __init__(self, block: Any) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([block])
        self.context_embedder = torch.nn.Identity()


def _toy_block(gamma: float, out_scale: float) -> Any:
    """A joint block whose modulation is off (LayerNorm only), with identity projections
    but: queries ``gamma I``, text/concept values ``2 I``, context output ``out_scale I``."""
    from diffusers.models.attention import JointTransformerBlock

    block = JointTransformerBlock(
        dim=4, num_attention_heads=1, attention_head_dim=4, context_pre_only=False
    )
    eye = torch.eye(4)
    weights = {
        "to_q": gamma * eye,
        "to_k": eye,
        "to_v": eye,
        "add_q_proj": gamma * eye,
        "add_k_proj": eye,
        "add_v_proj": 2 * eye,
        "to_add_out": out_scale * eye,
    }
    with torch.no_grad():
        for module in (block.norm1.linear, block.norm1_context.linear):
            module.weight.zero_()
            module.bias.zero_()
        for name, weight in weights.items():
            getattr(block.attn, name).weight.copy_(weight)
            getattr(block.attn, name).bias.zero_()
        block.attn.to_out[0].weight.copy_(eye)
        block.attn.to_out[0].bias.zero_()
    return block.eval()


def test_a_toy_block_gives_the_concept_maps_known_in_closed_form() -> None:
    # Zero-mean, unit-variance tokens pass LayerNorm unchanged; x1, x2, x3 are orthogonal,
    # x4 = -x3. The text token is x1, concept 1 is x1, concept 2 is x2.
    x1, x2, x3 = torch.tensor([[1.0, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    image = torch.stack([x1, x2, x3, -x3])[None]
    text = x1[None, None]
    concepts = torch.stack([x1, x2])[None]
    # Sharp queries (gamma = 10): a query attends equally to the keys equal to it and
    # nowhere else (other logits are 20 lower). Concept c_j sees [image, concepts]:
    #   o_c1 = (v_x1 + v_c1) / 2 = (x1 + 2 x1) / 2 = 1.5 x1,  o_c2 = 1.5 x2.
    # Image x_i sees [image, text]: o_x1 = (x1 + 2 x1) / 2 = 1.5 x1, o_x2 = x2, o_x3 = x3,
    # o_x4 = -x3. Scores o_x . o_c (attention space):
    expected = torch.tensor([[9.0, 0.0], [0.0, 6.0], [0.0, 0.0], [0.0, 0.0]])
    block = _toy_block(gamma=10.0, out_scale=3.0)
    family = SD3Family(SimpleNamespace(transformer=_Toy(block)))
    for mode in ("buffered", "inline"):
        tap = ConceptTap.from_embeddings(
            family,
            ["one", "two"],
            concepts,
            spaces=("output", "attention"),
            mode=mode,  # type: ignore[arg-type]
        )
        tap.layout = LatentLayout((4, 4), 2)  # 2 x 2 image tokens
        loop = LoopState(family, CfgLayout("none", 1.0))
        with TapRegistry([tap]).installed(loop), torch.no_grad():
            tap.on_call(DenoiserCall(torch.zeros(1, 4, 4, 4), torch.zeros(1), {}))
            block(hidden_states=image, encoder_hidden_states=text, temb=torch.zeros(1, 4))
        scores = tap.result()
        layer = "transformer_blocks.0.attn"
        got = scores.layer_scores(layer, "attention")[0].reshape(4, 2)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
        # The output space passes the concepts through to_add_out (3 I), the image through
        # to_out (I): every score three times larger.
        got = scores.layer_scores(layer, "output")[0].reshape(4, 2)
        np.testing.assert_allclose(got, 3 * expected.numpy(), atol=1e-3)


def test_the_toy_shows_concepts_never_see_the_text() -> None:
    # Concept 1 equals the text token: had it seen the text's key (value 2 x1), its output
    # would be (x1 + 2 x1 + 2 x1) / 3 = 5/3 x1 and the first score 10, not 9.
    x1, x2, x3 = torch.tensor([[1.0, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    block = _toy_block(gamma=10.0, out_scale=1.0)
    family = SD3Family(SimpleNamespace(transformer=_Toy(block)))
    tap = ConceptTap.from_embeddings(family, ["one"], x1[None, None], spaces=("attention",))
    tap.layout = LatentLayout((4, 4), 2)
    with TapRegistry([tap]).installed(LoopState(family, CfgLayout("none", 1.0))), torch.no_grad():
        tap.on_call(DenoiserCall(torch.zeros(1, 4, 4, 4), torch.zeros(1), {}))
        block(
            hidden_states=torch.stack([x1, x2, x3, -x3])[None],
            encoder_hidden_states=x1[None, None],
            temb=torch.zeros(1, 4),
        )
    got = tap.result().layer_scores("transformer_blocks.0.attn", "attention")[0, 0, 0, 0]
    assert got == pytest.approx(9.0, abs=1e-4)


# ------------------------------------------------------------------ the image is untouched
@pytest.mark.parametrize("case", [*JOINT_CASES, "flux_true_cfg", "unet"])
def test_the_image_is_bit_identical_to_an_untraced_one(
    case: str,
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
    tiny_sd_pipe: Any,
) -> None:
    from diffwidget.tracing.context import TraceContext

    pipe, kwargs = _family_pipe(case, family_case, tiny_sd_pipe)
    call = {k: v for k, v in kwargs.items() if k == "max_sequence_length"}
    flux = case.startswith("flux")
    if not flux:
        kwargs = {**kwargs, "guidance_scale": 5.0}
    w = float(kwargs.get("true_cfg_scale", 1.0)) if flux else 5.0

    def generate() -> np.ndarray:
        gen = torch.Generator().manual_seed(3)
        out = pipe(PROMPT, num_inference_steps=3, generator=gen, output_type="np", **kwargs)
        return np.asarray(out.images[0])

    plain = generate()
    for mode in ("buffered", "inline"):
        tap = ConceptTap(pipe, WORDS, call_kwargs=call, mode=mode)  # type: ignore[arg-type]
        ctx = TraceContext(
            pipe,
            prompt=PROMPT,
            guidance_scale=w,
            call_kwargs=kwargs,
            decode_previews=False,
            taps=[tap],
        )
        with ctx:
            traced = generate()
        np.testing.assert_array_equal(traced, plain)
        scores = tap.result()
        assert scores.steps == [0, 1, 2]
        assert all(np.isfinite(v).all() for v in scores.scores.values())


def test_replay_of_a_trace_gives_the_scores_recorded_during_it(
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
) -> None:
    pipe, kwargs = family_case("sd3")
    call = {"max_sequence_length": kwargs["max_sequence_length"]}
    tap = ConceptTap(pipe, WORDS, call_kwargs=call)
    recorded = trace(
        pipe, PROMPT, num_inference_steps=3, decode_previews=False, taps=[tap], **kwargs
    )
    during = tap.result()
    again = replay_concepts(pipe, recorded, ConceptTap(pipe, WORDS, call_kwargs=call, steps=[1, 2]))
    assert again.steps == [1, 2]
    for key, values in again.scores.items():
        np.testing.assert_allclose(values, during.scores[key][1:], rtol=1e-4, atol=1e-5)


def test_only_the_chosen_layers_and_steps_are_recorded(tiny_sd_pipe: Any) -> None:
    layers = ConceptTap(tiny_sd_pipe, WORDS).chosen
    tap = ConceptTap(tiny_sd_pipe, WORDS, layers=[layers[-1]], steps=[2])
    trace(tiny_sd_pipe, PROMPT, num_inference_steps=3, decode_previews=False, taps=[tap])
    scores = tap.result()
    assert scores.layers == [layers[-1]]
    assert scores.steps == [2]
    assert list(scores.scores) == [f"output:{layers[-1]}"]


def test_scores_save_and_load(tiny_sd_pipe: Any, tmp_path: Any) -> None:
    tap = ConceptTap(tiny_sd_pipe, WORDS, steps=[0])
    trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, decode_previews=False, taps=[tap])
    scores = tap.result()
    back = ConceptScores.load(scores.save(tmp_path / "scores.npz"))
    assert back.words == scores.words
    assert back.grids == scores.grids
    for key in scores.scores:
        np.testing.assert_array_equal(back.scores[key], scores.scores[key])


# ------------------------------------------------------------------ hostile input
@pytest.mark.parametrize(
    ("words", "error", "says"),
    [
        ([], ValueError, "at least one"),
        ("circle", TypeError, "list of strings"),
        (["circle", ""], ValueError, "empty"),
        (["  "], ValueError, "empty"),
        (["circle", "circle"], ValueError, "twice"),
        ([3], TypeError, "string"),
        (["x" * 200], ValueError, "characters"),
        ([f"w{i}" for i in range(MAX_CONCEPT_WORDS + 1)], ValueError, "at most"),
    ],
)
def test_bad_words_are_refused_with_the_fix(words: Any, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        check_words(words)


def test_bad_layers_spaces_modes_and_steps_are_refused(tiny_sd_pipe: Any) -> None:
    with pytest.raises(ValueError, match="no attention layer"):
        ConceptTap(tiny_sd_pipe, WORDS, layers=["mid_block.attn9"])
    with pytest.raises(ValueError, match="spaces"):
        ConceptTap(tiny_sd_pipe, WORDS, spaces=("latent",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        ConceptTap(tiny_sd_pipe, WORDS, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loop indices"):
        ConceptTap(tiny_sd_pipe, WORDS, steps=[-1])
    with pytest.raises(RuntimeError, match="recorded nothing"):
        ConceptTap(tiny_sd_pipe, WORDS).result()


def test_an_unknown_word_gets_the_tokenizers_warning(
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
) -> None:
    pipe, kwargs = family_case("flux")
    call = {"max_sequence_length": kwargs["max_sequence_length"]}
    # The tiny T5 vocabulary has no "€": SentencePiece reads it as <unk>.
    with pytest.warns(UnknownConceptWarning, match="'€'"):
        ConceptTap(pipe, ["circle", "€"], call_kwargs=call)


def test_the_embedded_models_warn_about_their_unknown_words() -> None:
    from diffwidget.models.loader import load_demo_pipeline
    from diffwidget.models.prompts import UnknownWordsWarning

    pipe = load_demo_pipeline("dit")
    with pytest.warns(UnknownWordsWarning, match="dog"):
        tap = ConceptTap(pipe, ["circle", "dog"])
    assert tap.words == ["circle", "dog"]


def test_no_hook_is_left_after_a_run_that_raised(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory()
    before = sorted(n for n, m in pipe.unet.named_modules() if hasattr(m, "_diffusers_hook"))
    tap = ConceptTap(pipe, WORDS)

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        trace(pipe, PROMPT, num_inference_steps=3, taps=[tap], callback_on_step_end=fail)
    after = sorted(n for n, m in pipe.unet.named_modules() if hasattr(m, "_diffusers_hook"))
    assert after == before
    assert not any("forward" in vars(m) for m in pipe.unet.modules())


@pytest.mark.parametrize("width", [16, 1024])
def test_concept_projections_copy_no_large_weights(width: int) -> None:
    """Small layers project concept tokens with one fused copy of their q/k/v weights; large
    ones (above FUSED_WEIGHT_BYTES, e.g. Flux's 113 MB a layer) with their own weights, so
    the tap adds no weight-sized copy to a step's peak memory. Same numbers either way."""
    from diffwidget.tracing.concept_attention import FUSED_WEIGHT_BYTES, ConceptLayer

    torch.manual_seed(0)
    projections = [torch.nn.Linear(width, width) for _ in range(3)]
    attn = SimpleNamespace(head_dim=width // 4)
    layer = ConceptLayer("attn", attn)
    x = torch.randn(1, 5, width)
    got = layer.tokens(x, *projections)
    fused_bytes = 3 * width * width * 4
    assert (layer._fused is not None) == (fused_bytes <= FUSED_WEIGHT_BYTES)
    for out, projection in zip(got, projections, strict=True):
        want = projection(x).unflatten(-1, (4, width // 4)).transpose(1, 2)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
