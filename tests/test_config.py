"""Schema validation: defaults, one-line errors naming the key, per-stage params."""

import pytest

from pipeline import PipelineError
from pipeline.config import (
    build,
    byol_params,
    latent_params,
    load_schema,
    parse_run_name,
    run_name,
    validate_config,
)
from pipeline.evaluate import EvaluateParams


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _walk(sub, f"{path}{key}.")


def test_every_key_has_type_default_and_description():
    for key, sub in _walk(load_schema()):
        assert "type" in sub or "enum" in sub, key
        assert sub.get("description"), key
        # Per-model overrides deliberately have no default: absent means "use the shared key".
        overrides = key.endswith((".epochs", ".dim")) and key.count(".") == 2
        assert "default" in sub or overrides, key


def test_defaults_fill_an_empty_config():
    cfg = validate_config({})
    assert cfg["dataset"]["name"] == "digits"
    assert cfg["latent"]["models"] == ["autodecoder", "ae", "vae"]
    assert cfg["byol"]["probabilistic"]["p_neighbour"] == 0.5
    assert cfg["dataset"]["synthetic"]["classes"] == 4


@pytest.mark.parametrize(
    "config, message",
    [
        ({"latent": {"dim": "big"}}, "config key 'latent.dim': 'big' is not of type 'integer'"),
        ({"latent": {"dim": 0}}, "config key 'latent.dim': 0 is less than the minimum of 1"),
        ({"latent": {"colour": 1}}, "config: unknown key 'latent.colour'"),
        ({"sede": 1}, "config: unknown key 'sede'"),
        ({"dataset": {"name": "imagenet"}}, "config key 'dataset.name': 'imagenet' is not one of"),
        ({"byol": {"probabilistic": {"p_neighbour": 1.5}}},
         "config key 'byol.probabilistic.p_neighbour': 1.5 is greater than the maximum of 1"),
        ({"byol": {"weighted": {"pos_weight": -0.1}}},
         "config key 'byol.weighted.pos_weight': -0.1 is less than the minimum of 0"),
        ({"latent": {"models": ["gan"]}}, "config key 'latent.models.0': 'gan' is not one of"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(PipelineError) as err:
        validate_config(config)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_stage_params_exclude_other_models_and_variants():
    cfg = validate_config({})
    changed = validate_config({"latent": {"vae": {"beta": 4.0}}})
    assert latent_params(cfg, "ae") == latent_params(changed, "ae")
    assert latent_params(cfg, "vae") != latent_params(changed, "vae")
    assert "p_neighbour" not in byol_params(cfg, "baseline")
    assert byol_params(cfg, "weighted")["pos_weight"] == 0.5
    override = validate_config({"latent": {"epochs": 7, "vae": {"epochs": 3}}})
    assert latent_params(override, "vae")["epochs"] == 3
    assert latent_params(override, "ae")["epochs"] == 7
    assert list(latent_params(cfg, "vae")) == sorted(latent_params(cfg, "vae"))


def test_build_rejects_unknown_and_mistyped_params():
    assert build(EvaluateParams, {"C": 2}).C == 2.0
    with pytest.raises(PipelineError, match=r"unknown params \['c'\]"):
        build(EvaluateParams, {"c": 2})
    with pytest.raises(PipelineError, match="param 'max_iter': expected int"):
        build(EvaluateParams, {"max_iter": "many"})


@pytest.mark.parametrize("args, name", [
    (("pixels",), "pixels"),
    (("latent", "", "vae"), "latent-vae"),
    (("byol", "baseline"), "byol-baseline"),
    (("byol", "probabilistic", "vae", "cosine"), "byol-probabilistic-vae-cosine"),
])
def test_run_names_round_trip(args, name):
    assert run_name(*args) == name
    parsed = parse_run_name(name)
    assert parsed["stage"] == args[0]
    assert run_name(parsed["stage"], parsed["variant"], parsed["latent"], parsed["metric"]) == name
