"""How a run is told its methods' settings: typed configs, one home per default, one CLI map."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from run_support import REPO, env

from diffwidget import cli as command
from diffwidget.cli.run import CONFIG_FLAGS, method_configs
from diffwidget.explain.cam import DFCamConfig
from diffwidget.explain.faithfulness import InsertionDeletion, InsertionDeletionConfig
from diffwidget.explain.rise import DFRise, DFRiseConfig
from diffwidget.runs.metrics import DEFAULT_METHODS, MAP_METHODS
from diffwidget.runs.runner import check_settings
from diffwidget.runs.settings import RunSettings, split_methods
from diffwidget.runs.store import RunSetupError


def _args(*argv: str) -> Any:
    return command.build_parser().parse_args(["run", "scene:2", "--out", "o", *argv])


def test_names_configs_and_method_objects_all_configure_a_run() -> None:
    cam = DFCamConfig(blocks=["mid_block"])
    names, configs = split_methods(["attention", DFRiseConfig(n_masks=8), cam])
    assert names == ["attention", "df_rise", "df_cam"]
    assert configs == {"df_rise": DFRiseConfig(n_masks=8), "df_cam": DFCamConfig(("mid_block",))}
    names, configs = split_methods([DFRise(n_masks=9, progress_bar=False)])
    assert (names, configs) == (["df_rise"], {"df_rise": DFRiseConfig(n_masks=9)})
    with pytest.raises(TypeError, match="names, configs or method objects"):
        split_methods([3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="configures no registered method"):
        split_methods([InsertionDeletionConfig()])


def test_settings_fill_the_defaults_once_and_name_each_setting() -> None:
    settings = check_settings(RunSettings.of(["attention", DFRiseConfig(n_masks=8), "df_cam"]))
    configs = {name: settings.config(name) for name in settings.configs}
    assert configs == {"df_rise": DFRiseConfig(n_masks=8), "df_cam": DFCamConfig()}
    assert settings.faithfulness_config() == InsertionDeletionConfig()
    named = settings.named()
    assert named["df_rise.n_masks"] == 8
    assert named["df_cam.blocks"] is None
    # The defaults are the configs' own, read from one place.
    assert named["faithfulness.n_random"] == InsertionDeletionConfig().n_random == 3
    assert named["methods"] == list(DEFAULT_METHODS)
    # The manifest stores each config in its own JSON form.
    manifest = settings.to_json()
    assert manifest["configs"] == {m: c.to_json() for m, c in configs.items()}
    assert manifest["faithfulness"] == InsertionDeletionConfig().to_json()
    with pytest.raises(RunSetupError, match="does not compute"):
        check_settings(
            RunSettings(methods=("attention",), configs={"df_rise": DFRiseConfig().to_json()})
        )


def test_every_registered_saliency_method_is_a_run_method() -> None:
    from diffwidget.explain.protocol import SALIENCY_METHOD_NAMES

    assert ("attention", *SALIENCY_METHOD_NAMES) == MAP_METHODS


def test_cli_flags_map_onto_the_configs() -> None:
    methods, faithfulness = method_configs(
        _args("--rise-masks", "8", "--set", "df_rise.p=0.3", "--set", "faithfulness.operator=zero")
    )
    assert methods == ["attention", DFRiseConfig(n_masks=8, p=0.3), "df_cam"]
    assert faithfulness == InsertionDeletionConfig(operator="zero")
    _, faithfulness = method_configs(_args("--n-random", "1", "--cells-per-stage", "64"))
    assert faithfulness == InsertionDeletionConfig(n_random=1, cells_per_stage=64)
    assert method_configs(_args()) == (list(DEFAULT_METHODS), InsertionDeletionConfig())
    assert set(CONFIG_FLAGS) == {"--rise-masks", "--n-random", "--cells-per-stage"}
    assert isinstance(InsertionDeletion(faithfulness).config, InsertionDeletionConfig)


def test_the_commitment_switch_steps_are_set_like_a_methods() -> None:
    from diffwidget.explain.prompt_switch import PromptSwitchConfig

    argv = ["--metrics", "commitment", "--set", "prompt_switch.switch_steps=[0, 5, 10]"]
    methods, _ = method_configs(_args(*argv))
    assert methods == [*DEFAULT_METHODS, PromptSwitchConfig(switch_steps=[0, 5, 10])]
    settings = RunSettings.of(methods, metrics=("commitment",), inference_steps=10).checked()
    assert settings.methods == DEFAULT_METHODS
    assert settings.configs["prompt_switch"]["switch_steps"] == [0, 5, 10]
    with pytest.raises(command.UsageError, match="no commitment"):
        method_configs(_args("--set", "prompt_switch.switch_steps=[0]"))


def test_the_concept_control_words_are_set_like_a_methods_and_change_the_digest() -> None:
    from diffwidget.explain.concept_maps import ConceptMapsConfig

    argv = ["--metrics", "concepts", "--set", 'concept_maps.words=["sky", "dog"]']
    methods, _ = method_configs(_args(*argv))
    assert methods == [*DEFAULT_METHODS, ConceptMapsConfig(words=("sky", "dog"))]
    settings = RunSettings.of(methods, metrics=("concepts",), inference_steps=10).checked()
    assert settings.methods == DEFAULT_METHODS
    assert settings.configs["concept_maps"]["words"] == ["sky", "dog"]
    defaults = RunSettings.of(DEFAULT_METHODS, metrics=("concepts",), inference_steps=10)
    assert defaults.checked().configs["concept_maps"] == ConceptMapsConfig().to_json()
    assert defaults.checked().digest() != settings.digest()
    with pytest.raises(command.UsageError, match="no concepts"):
        method_configs(_args("--set", 'concept_maps.words=["sky"]'))
    with pytest.raises(command.UsageError, match="given twice"):
        method_configs(_args(*argv[:3], 'concept_maps.words=["sky", "sky"]'))
    with pytest.raises(RunSetupError, match="metric that uses them"):
        check_settings(RunSettings.of([*DEFAULT_METHODS, ConceptMapsConfig(words=("sky",))]))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "df_rise.bogus=1"], "unknown keys 'bogus'"),
        (["--set", "df_rise.n_masks=many"], "should be an integer"),
        (["--set", "df_rise.masks=grid"], "one of 'bernoulli', 'smooth'"),
        (["--set", "df_rise"], "METHOD.SETTING=VALUE"),
        (["--methods", "df_cam", "--rise-masks", "8"], "does not compute"),
        (["--rise-masks", "0"], "n_masks must be at least 1"),
    ],
)
def test_bad_settings_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(command.UsageError, match=message):
        method_configs(_args(*argv))


def test_help_shows_the_configs_defaults_and_the_parser_needs_no_torch() -> None:
    script = (
        "import sys\n"
        "from diffwidget import cli\n"
        "cli.build_parser()\n"
        "assert 'torch' not in sys.modules\n"
        "cli.main(['run', '--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env(), cwd=REPO
    )
    assert "default: 500; sets df_rise.n_masks" in " ".join(result.stdout.split())
    assert "default: 3; sets faithfulness.n_random" in " ".join(result.stdout.split())
