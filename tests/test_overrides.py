"""``--set KEY=VALUE``: one parser, typed by the dataclass it sets, at every command that takes it."""
from __future__ import annotations

import dataclasses

import pytest

from raydd.cli import build_parser, farm_spec_from_args, main
from raydd.condense_cli import eval_config_from_args, condense_plan
from raydd.farm.recipes import ExpertConfig, PretrainConfig
from raydd.farm.spec import FarmSpec
from raydd.overrides import read_value


def parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("text", ["False", "false", "no", "0", "off"])
def test_farm_set_dsa_false_turns_dsa_off(text):
    """raydd farm --set dsa=False stored the string 'False' (truthy: DSA stayed on, under a new id)."""
    spec = farm_spec_from_args(parse(["farm", "--set", f"dsa={text}"]))
    assert spec.recipe_options == {"dsa": False}
    assert spec.recipe_config().dsa is False
    from_yaml = FarmSpec.from_dict({**FarmSpec().to_dict(), "recipe_options": {"dsa": False}})
    assert spec.to_dict() == from_yaml.to_dict()  # the same trajectory as the YAML's dsa: false


def test_recipe_configs_enforce_their_annotations():
    with pytest.raises(ValueError, match=r"ExpertConfig.dsa='False' is invalid: expected bool"):
        ExpertConfig(dsa="False")
    with pytest.raises(ValueError, match=r"ExpertConfig.epochs=True is invalid: expected int"):
        ExpertConfig(epochs=True)
    assert ExpertConfig(lr=1).lr == 1.0 and isinstance(ExpertConfig(lr=1).lr, float)  # lr=1 and lr=1.0: one id
    assert PretrainConfig(milestones=[0.5, 0.75]).milestones == (0.5, 0.75)  # JSON/YAML lists


def test_farm_set_values_are_read_by_the_recipe_fields():
    spec = farm_spec_from_args(parse(["farm", "--recipe", "pretrain", "--set", "milestones=0.5,0.8",
                                      "--set", "lr=1", "--set", "dsa_strategy=color_crop"]))
    assert spec.recipe_options == {"milestones": (0.5, 0.8), "lr": 1.0, "dsa_strategy": "color_crop"}
    spec = farm_spec_from_args(parse(["farm", "--set", "keep_epochs=none", "--set", "keep_epochs=4"]))
    assert spec.recipe_options == {"keep_epochs": 4}  # the last of a repeated key wins
    spec = farm_spec_from_args(parse(["farm", "--set", "keep_epochs=None"]))
    assert spec.recipe_options == {"keep_epochs": None}


def test_read_value_by_annotation():
    assert read_value(bool, "TRUE") is True and read_value(bool, "0") is False
    assert read_value(int | None, "none") is None and read_value(int | None, "7") == 7
    assert read_value(float, "1e-3") == 1e-3
    assert read_value(tuple[float, ...], "[0.5, 0.9]") == (0.5, 0.9)
    assert read_value(str | dict, '{"arch": "convnet"}') == {"arch": "convnet"}
    assert read_value(str | dict, "convnet3-w16-in") == "convnet3-w16-in"
    assert read_value(str, "none") == "none"  # a str field takes the word itself
    for hint, text in ((bool, "maybe"), (int, "2.5"), (float, "fast"), (tuple[int, ...], "1,x")):
        with pytest.raises(ValueError):
            read_value(hint, text)


def test_condense_set_is_typed_by_the_method_config_and_resolves_aliases():
    plan = condense_plan(parse(["condense", "--method", "mtt", "--dataset", "digits", "--ipc", "1",
                                "--iterations", "5", "--set", "syn_steps=3", "--set", "lr_img=100",
                                "--set", "dsa=false"]))
    assert (plan.config.syn_steps, plan.config.lr_img, plan.config.dsa, plan.iterations) == (3, 100.0, False, 5)
    config = condense_plan(parse(["condense", "--method", "datm_clr", "--dataset", "digits", "--ipc", "1",
                                  "--set", "tau=0.5", "--set", "alpha=2"])).config  # the sweep symbols τ, α
    assert (config.temperature, config.con_weight) == (0.5, 2.0)
    with pytest.raises(ValueError, match=r"--set tau=hot is invalid: DATMCLRConfig.temperature expects float"):
        condense_plan(parse(["condense", "--method", "datm_clr", "--dataset", "digits", "--ipc", "1",
                             "--set", "tau=hot"]))


def test_evaluate_set_reaches_the_protocol_config():
    config = eval_config_from_args(parse(["evaluate", "s.safetensors", "--set", "dsa=false", "--set",
                                          "lr_decay_at=none", "--set", "momentum=0.5", "--set", "extra_pass=false",
                                          "--set", "decay_resets_momentum=false", "--set",
                                          "dsa_align_corners=true"]), "digits")
    assert (config.dsa, config.lr_decay_at, config.momentum) == (False, None, 0.5)
    assert (config.extra_pass, config.decay_resets_momentum, config.dsa_align_corners) == (False, False, True)
    with pytest.raises(ValueError, match=r"extra_pass=maybe is invalid: EvalConfig.extra_pass expects bool"):
        eval_config_from_args(parse(["evaluate", "s.safetensors", "--set", "extra_pass=maybe"]), "digits")
    config = eval_config_from_args(parse(["evaluate", "s.safetensors", "--protocol", "edc", "--set",
                                          "milestones=0.5,0.7", "--set", 'model={"arch": "convnet", "width": 16}']),
                                   "digits")
    assert config.milestones == (0.5, 0.7) and config.model == {"arch": "convnet", "width": 16}


def test_reproduce_set_wins_over_the_run_length(capsys):
    """raydd reproduce ptlm_fashion_mnist_ipc10 --scale cpu --set total_iterations=50 planned its horizon for
    the run length (200) after the override, while the ledger recorded the override as a departure."""
    assert main(["reproduce", "ptlm_fashion_mnist_ipc10", "--scale", "cpu", "--set", "total_iterations=50",
                 "--plan"]) == 0
    plan = capsys.readouterr().out
    knobs = next(line for line in plan.splitlines() if line.startswith("- knobs that differ"))
    assert "total_iterations=50" in knobs and "total_iterations=200" not in knobs
    assert main(["reproduce", "ptlm_fashion_mnist_ipc10", "--scale", "cpu", "--plan"]) == 0
    assert "total_iterations=200" in capsys.readouterr().out  # without --set: planned for the 200 iterations
    from raydd.reproduce.settings import get_scale, get_setting

    setting, scale = get_setting("ptlm_fashion_mnist_ipc10"), get_scale("cpu")
    config, _ = setting.plan(dataclasses.replace(scale, knobs=(("total_iterations", 50),)))
    assert config.total_iterations == 50
