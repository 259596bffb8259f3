"""Experiments on one's own data: which config a run uses, where its results go, profiles."""

import re

import yaml
from conftest import tiny_config


def _byol_params(text: str) -> dict:
    """The flat BYOL params of the first planned baseline job (from `--printshellcmds`)."""
    match = re.search(r"byol --variant baseline .*?--params '([^']*)'", text)
    assert match, text
    return yaml.safe_load(match.group(1))


def test_a_configfile_replaces_config_yaml_and_gets_schema_defaults(workflow):
    # config.yaml is a digits experiment with tuned values the other experiment must not see.
    workflow.write_config({**tiny_config(), "dataset": {"name": "digits"},
                           "byol": {"batch_size": 16, "lr": 0.01, "seeds": [0, 1]}})
    (workflow.path / "mine.yaml").write_text(yaml.safe_dump(
        {"dataset": {"name": "synthetic"}, "byol": {"variants": ["baseline"]}}))
    proc = workflow.run("--dry-run", "--printshellcmds", "results/linear_eval.csv",
                        "--configfile", "mine.yaml")
    text = proc.stdout + proc.stderr
    params = _byol_params(text)
    assert params["batch_size"] == 256 and params["lr"] == 0.002
    assert params["view1.crop_min_scale"] == 0.3 and params["view2.flip_prob"] == 0.5
    assert params["view1.blur_prob"] == 1.0 and params["view2.solarize_prob"] == 0.2
    # Its own folder, named after the config file, and the schema's three seeds.
    assert "results/mine/data.npz" in text and "results/digits" not in text
    assert {f"--seed {s}" for s in range(3)} <= set(re.findall(r"--seed \d", text))


def test_nested_command_line_overrides_are_typed(workflow):
    proc = workflow.run("--dry-run", "--printshellcmds", "--config",
                        'byol={"epochs": 3, "compile": false, "seeds": [4]}',
                        'dataset={"max_train": 50, "synthetic": {"classes": 3}}')
    text = proc.stdout + proc.stderr
    params = _byol_params(text)
    assert params["epochs"] == 3 and params["compile"] is False
    assert "--seed 4" in text
    assert '"max_train":50' in text


def test_a_bad_override_fails_with_one_line_naming_the_key(workflow):
    proc = workflow.run("--dry-run", "--config", 'byol={"lr": "fast"}', check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors[0] == "error: config key 'byol.lr': 'fast' is not of type 'number'"
    assert not (workflow.path / "results").exists()


def test_the_bare_command_uses_the_local_profile(workflow):
    proc = workflow.run("--dry-run", "results/linear_eval.csv")
    assert "workflow specific profile profiles/default" in proc.stderr


def test_the_slurm_profile_is_chosen_by_name(workflow):
    proc = workflow.run("--workflow-profile", "slurm", "--dry-run")
    assert "workflow specific profile profiles/slurm" in proc.stderr
