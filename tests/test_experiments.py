"""Experiments on one's own data: which config a run uses, where its results go, profiles."""

import re

import yaml
from conftest import tiny_config


def _train_params(text: str) -> dict:
    """The flat training params of the first planned byol-baseline job (from
    `--printshellcmds`)."""
    match = re.search(r" train --method byol --use baseline .*?--params '([^']*)'", text)
    assert match, text
    return yaml.safe_load(match.group(1))


def test_a_configfile_replaces_config_yaml_and_gets_schema_defaults(workflow):
    # config.yaml is a digits experiment with tuned values the other experiment must not see.
    workflow.write_config({**tiny_config(), "dataset": {"name": "digits"},
                           "train": {"batch_size": 16, "lr": 0.01, "seeds": [0, 1]}})
    (workflow.path / "mine.yaml").write_text(yaml.safe_dump(
        {"dataset": {"name": "synthetic"}, "train": {"uses": ["baseline"]}}))
    proc = workflow.run("--dry-run", "--printshellcmds", "results/linear_eval.csv",
                        "--configfile", "mine.yaml")
    text = proc.stdout + proc.stderr
    params = _train_params(text)
    assert params["batch_size"] == 256 and params["lr"] == 0.002
    assert params["view1.crop_min_scale"] == 0.3 and params["view2.flip_prob"] == 0.5
    assert params["view1.blur_prob"] == 1.0 and params["view2.solarize_prob"] == 0.2
    # Its own folder, named after the config file, and the schema's three seeds.
    assert "results/mine/prepared" in text and "results/digits" not in text
    assert {f"--seed {s}" for s in range(3)} <= set(re.findall(r"--seed \d", text))


def test_nested_command_line_overrides_are_typed(workflow):
    proc = workflow.run("--dry-run", "--printshellcmds", "--config",
                        'train={"epochs": 3, "compile": false, "seeds": [4]}',
                        'dataset={"max_train": 50, "synthetic": {"classes": 3}}')
    text = proc.stdout + proc.stderr
    params = _train_params(text)
    assert params["epochs"] == 3 and params["compile"] is False
    assert "--seed 4" in text
    assert '"max_train":50' in text


def test_a_bad_override_fails_with_one_line_naming_the_key(workflow):
    proc = workflow.run("--dry-run", "--config", 'train={"lr": "fast"}', check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors[0] == "error: config key 'train.lr': 'fast' is not of type 'number'"
    assert not (workflow.path / "results").exists()


def test_the_bare_command_uses_the_local_profile(workflow):
    proc = workflow.run("--dry-run", "results/linear_eval.csv")
    assert "workflow specific profile profiles/default" in proc.stderr


def test_the_slurm_profile_is_chosen_by_name(workflow):
    proc = workflow.run("--workflow-profile", "slurm", "--dry-run")
    assert "workflow specific profile profiles/slurm" in proc.stderr


# A grid of three cheap jobs' worth of training: the baseline only, one seed, one epoch.
SMALL = {"latent": {"models": []}, "neighbours": {"pixels": False},
         "train": {"uses": ["baseline"], "epochs": 1, "warmup_epochs": 0, "seeds": [0]},
         "evaluate": {"untrained": False}}


def _write(path, config):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return str(path.relative_to(path.parents[2]))


def _error(proc):
    """The first line of the workflow's own message (Snakemake's banner lines come before)."""
    return next(line for line in proc.stderr.splitlines() if line.startswith("error:"))


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_named_configs_in_two_folders_never_overwrite_each_other(workflow):
    first = _write(workflow.path / "experiments" / "a" / "exp.yaml", tiny_config(**SMALL))
    second = _write(workflow.path / "experiments" / "b" / "exp.yaml",
                    tiny_config(**SMALL, seed=1))
    workflow.run("results/linear_eval.csv", "--configfile", first)
    folder = workflow.path / "results" / "exp"
    owner = yaml.safe_load((folder / "experiment.json").read_text())
    assert owner["config_file"] == str(workflow.path / first)
    before = _files(folder)
    proc = workflow.run("results/linear_eval.csv", "--configfile", second, check=False)
    assert proc.returncode == 1
    assert _error(proc) == (
        f"error: results/exp holds the experiment of {first}; {second} is a different config "
        "and would overwrite it: give it a folder of its own with dataset.tag (in the file, "
        "or --config 'dataset={\"tag\": \"NAME\"}'), or delete results/exp to start over")
    assert _files(folder) == before
    # The same file, edited, re-uses its folder; a tag gives the other one its own.
    workflow.run("--dry-run", "results/linear_eval.csv", "--configfile", first)
    proc = workflow.run("--dry-run", "results/linear_eval.csv", "--configfile", second,
                        "--config", 'dataset={"tag": "b-exp"}')
    assert "results/b-exp/prepared" in proc.stdout


def test_experiments_laid_out_as_name_slash_config_yaml_get_the_folder_name(workflow):
    mine = _write(workflow.path / "experiments" / "mine" / "config.yaml", tiny_config(**SMALL))
    proc = workflow.run("--dry-run", "results/linear_eval.csv", "--configfile", mine)
    assert "results/mine/prepared" in proc.stdout
    # The workflow's own config.yaml, named explicitly, is the default experiment.
    proc = workflow.run("--dry-run", "results/linear_eval.csv", "--configfile", "config.yaml")
    assert "results/synthetic/prepared" in proc.stdout
    assert not (workflow.path / "results").exists()  # a dry run claims no folder


def test_the_report_is_of_the_given_config_and_refuses_another_folder(workflow):
    mine = _write(workflow.path / "experiments" / "mine" / "config.yaml", tiny_config(**SMALL))
    proc = workflow.run("--report", "results/mine/report.html", check=False)
    assert proc.returncode == 1
    assert _error(proc) == (
        "error: --report results/mine/report.html is not in results/synthetic, the folder of "
        "config.yaml: add --configfile the experiment's config to report that experiment")
    proc = workflow.run("--report", "results/mine/report.html", "--configfile", mine,
                        check=False)
    assert proc.returncode == 1
    assert _error(proc) == (
        "error: results/mine has no results yet (results/mine/linear_eval.csv is missing): run "
        f"snakemake --cores 8 results/linear_eval.csv --configfile {mine} first, then the report")
    workflow.run("results/linear_eval.csv", "--configfile", mine)
    # Once the folder has an owner, the refusal names the config to pass.
    proc = workflow.run("--report", "results/mine/report.html", check=False)
    assert _error(proc).endswith(
        f"add --configfile {mine} to report that experiment")
    workflow.run("--report", "results/mine/report.html", "--configfile", mine)
    assert (workflow.path / "results" / "mine" / "report.html").stat().st_size > 10_000


def test_experiment_dir_prints_the_folder_make_report_writes_into(tmp_path, capsys):
    from pipeline.__main__ import main

    mine = tmp_path / "experiments" / "mine" / "config.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("dataset: {name: synthetic}\n")
    assert main(["experiment-dir", str(mine)]) == 0
    assert capsys.readouterr().out == "results/mine\n"
    mine.write_text("dataset: {name: synthetic, tag: small}\n")
    assert main(["experiment-dir", str(mine)]) == 0
    assert capsys.readouterr().out == "results/small\n"
