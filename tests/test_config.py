"""Schema validation: defaults, one-line errors naming the key, per-stage params."""

import pytest

from pipeline import PipelineError
from pipeline.config import (
    build,
    evaluate_params,
    field_schema,
    latent_params,
    load_preset,
    load_schema,
    neighbours_params,
    presets,
    read_config_file,
    resolve_config,
    runtime_params,
    validate_config,
)
from pipeline.evaluate import EvaluateParams
from pipeline.experiments import WORKFLOW_CONFIG, experiment_tag
from pipeline.train.grid import Run, runs, train_params


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
        # So do a view's overrides of the shared train.augment keys.
        overrides |= key.startswith(("train.view1.", "train.view2.")) and \
            key.rsplit(".", 1)[1] in load_schema()["properties"]["train"]["properties"][
                "augment"]["properties"]
        assert "default" in sub or overrides, key


def test_defaults_fill_an_empty_config():
    cfg = validate_config({})
    assert cfg["dataset"]["name"] == "digits"
    assert cfg["latent"]["models"] == ["autodecoder", "ae", "vae"]
    assert cfg["train"]["probabilistic"]["p_neighbour"] == 0.5
    assert cfg["train"]["methods"] == ["byol"] and cfg["byol"] == {"tau_base": 0.99}
    assert cfg["simclr"] == {"temperature": 0.2}
    assert cfg["nnclr"] == {"temperature": 0.2, "queue_size": 4096, "k": 1}
    assert cfg["dataset"]["synthetic"]["classes"] == 4


@pytest.mark.parametrize(
    "config, message",
    [
        ({"latent": {"dim": "big"}}, "config key 'latent.dim': 'big' is not of type 'integer'"),
        ({"latent": {"dim": 0}}, "config key 'latent.dim': 0 is less than the minimum of 1"),
        ({"latent": {"colour": 1}}, "config: unknown key 'latent.colour'"),
        ({"sede": 1}, "config: unknown key 'sede'"),
        ({"dataset": {"name": "imagenet"}}, "config key 'dataset.name': 'imagenet' is not one of"),
        ({"train": {"probabilistic": {"p_neighbour": 1.5}}},
         "config key 'train.probabilistic.p_neighbour': 1.5 is greater than the maximum of 1"),
        ({"train": {"weighted": {"pos_weight": -0.1}}},
         "config key 'train.weighted.pos_weight': -0.1 is less than the minimum of 0"),
        ({"train": {"methods": ["moco"]}},
         "config key 'train.methods.0': 'moco' is not one of ['byol', 'simclr', 'nnclr']"),
        ({"byol": {"tau_base": 1.5}},
         "config key 'byol.tau_base': 1.5 is greater than the maximum of 1"),
        ({"nnclr": {"k": 0}}, "config key 'nnclr.k': 0 is less than the minimum of 1"),
        ({"latent": {"models": ["gan"]}}, "config key 'latent.models.0': 'gan' is not one of"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(PipelineError) as err:
        validate_config(config)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_stage_params_exclude_other_models_and_uses():
    cfg = validate_config({})
    changed = validate_config({"latent": {"vae": {"beta": 4.0}}})
    assert latent_params(cfg, "ae") == latent_params(changed, "ae")
    assert latent_params(cfg, "vae") != latent_params(changed, "vae")
    baseline = train_params(cfg, Run("byol"))
    assert not any(k.startswith(("probabilistic.", "weighted.", "topk.")) for k in baseline)
    weighted = train_params(cfg, Run("byol", "weighted", "latent", "ae", "cosine"))
    assert weighted["weighted.pos_weight"] == 0.5 and "probabilistic.p_neighbour" not in weighted
    assert weighted["byol.tau_base"] == 0.99 and "simclr.temperature" not in weighted
    override = validate_config({"latent": {"epochs": 7, "vae": {"epochs": 3}}})
    assert latent_params(override, "vae")["epochs"] == 3
    assert latent_params(override, "ae")["epochs"] == 7
    assert list(latent_params(cfg, "vae")) == sorted(latent_params(cfg, "vae"))


def test_build_rejects_unknown_and_mistyped_params():
    assert build(EvaluateParams, {"C": 2}).C == 2.0
    with pytest.raises(PipelineError, match=r"unknown params \['c'\]"):
        build(EvaluateParams, {"c": 2})
    with pytest.raises(PipelineError, match="config key 'evaluate.max_iter': 'many' is not of"):
        build(EvaluateParams, {"max_iter": "many"})


@pytest.mark.parametrize("run, name, columns", [
    (Run("byol"), "byol-baseline", ("byol", "baseline", "", "", "", None)),
    (Run("nnclr"), "nnclr-baseline", ("nnclr", "baseline", "", "", "", None)),
    (Run("byol", "probabilistic", "latent", "vae", "cosine"), "byol-probabilistic-vae-cosine",
     ("byol", "probabilistic", "latent", "vae", "cosine", 1)),
    (Run("simclr", "probabilistic", "latent", "ae", "cosine"),
     "simclr-probabilistic-ae-cosine", ("simclr", "probabilistic", "latent", "ae", "cosine", 1)),
    (Run("byol", "weighted", "refresh", "vae", "cosine", 2), "byol-weighted-vae-cosine-r2",
     ("byol", "weighted", "refresh", "vae", "cosine", 2)),
    (Run("byol", "topk", "queue"), "byol-topk-queue", ("byol", "topk", "queue", "", "", None)),
])
def test_run_names_and_columns_say_what_a_run_is(run, name, columns):
    """A run's name is built from its fields (never parsed back); the results table gets the
    fields themselves as columns."""
    assert run.name == name
    keys = ("method", "variant", "source", "latent", "metric", "round")
    assert run.columns() == dict(zip(keys, columns, strict=True))
    assert run.baseline == f"{run.method}-baseline"
    if run.source == "refresh":  # round r mines the features of round r - 1
        assert run.previous() == Run(run.method, run.use, "latent" if run.round == 2
                                     else "refresh", run.space, run.metric, run.round - 1)


def test_digits_preset_never_reaches_another_data_set():
    digits = resolve_config({})
    assert digits["train"]["batch_size"] == 64
    assert digits["train"]["augment"]["flip_prob"] == 0.0
    assert digits["nnclr"]["queue_size"] == 1024
    schema = load_schema()["properties"]["train"]["properties"]
    other = resolve_config({"dataset": {"name": "synthetic"}})
    assert other["train"]["batch_size"] == schema["batch_size"]["default"] == 256
    assert other["train"]["augment"]["flip_prob"] == 0.5
    assert other["nnclr"]["queue_size"] == 4096
    # A key the user sets beats the preset; `preset: none` leaves the schema defaults.
    assert resolve_config({"train": {"batch_size": 32}})["train"]["batch_size"] == 32
    assert resolve_config({"preset": "none"})["train"]["batch_size"] == 256
    with pytest.raises(PipelineError, match="config key 'preset': no preset 'mnist'"):
        resolve_config({"preset": "mnist"})


def test_nested_command_line_strings_are_typed_by_the_schema():
    # What Snakemake hands over for --config 'train={"epochs": 2, ...}' 'dataset={...}'.
    cfg = resolve_config({
        "train": {"epochs": "3", "seeds": ["0", "1"], "compile": "true",
                  "methods": ["byol", "simclr"]},
        "simclr": {"temperature": "0.5"},
        "dataset": {"max_train": "null", "download": "false", "tag": "007"},
        "latent": {"lr": "1e-3", "models": ["ae"]},
    })
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["seeds"] == [0, 1]
    assert cfg["train"]["compile"] is True and cfg["dataset"]["download"] is False
    assert cfg["train"]["methods"] == ["byol", "simclr"] and cfg["simclr"]["temperature"] == 0.5
    assert cfg["dataset"]["max_train"] is None and cfg["dataset"]["tag"] == "007"
    assert cfg["latent"]["lr"] == 0.001 and cfg["latent"]["models"] == ["ae"]
    with pytest.raises(PipelineError, match="config key 'train.epochs': 'two' is not of type"):
        resolve_config({"train": {"epochs": "two"}})


@pytest.mark.parametrize("config, message", [
    ({"train": {"lr": float("nan")}}, "config key 'train.lr': nan is not a finite number"),
    ({"latent": {"lr": float("inf")}}, "config key 'latent.lr': inf is not a finite number"),
    ({"seed": 2**64}, "config key 'seed': 18446744073709551616 is greater than the maximum"),
    ({"train": {"seeds": [0, 2**33]}}, "config key 'train.seeds.1': 8589934592 is greater"),
    ({"latent": {"models": []}}, "config key 'latent.models': [] is empty, but train.uses"),
    ({"neighbours": {"metrics": []}}, "config key 'neighbours.metrics': [] should be non-empty"),
    ({"train": {"uses": []}}, "config key 'train.uses': [] should be non-empty"),
    ({"train": {"methods": []}}, "config key 'train.methods': [] should be non-empty"),
])
def test_values_that_would_fail_mid_run_are_rejected_up_front(config, message):
    with pytest.raises(PipelineError) as err:
        resolve_config(config)
    assert str(err.value).startswith(message)


def test_baseline_only_grid_needs_no_latent_space():
    cfg = resolve_config({"latent": {"models": []}, "train": {"uses": ["baseline"]}})
    assert cfg["latent"]["models"] == []


def test_runtime_switches_stay_out_of_stage_params():
    cfg = resolve_config({})
    for run in runs(cfg):
        assert not {"checkpoint_every", "device_memory_share", "knn_monitor", "tensorboard",
                    "methods", "uses", "seeds", "sources", "refresh_rounds"} & set(
            train_params(cfg, run)), run.name
    assert "chunk_size" not in neighbours_params(cfg)
    assert "untrained" not in evaluate_params(cfg)
    assert runtime_params(cfg, "train") == {"checkpoint_every": 5, "device_memory_share": 0.5,
                                            "knn_monitor": 1000, "tensorboard": False}
    assert runtime_params(cfg, "latent") == {"on_collapse": "error", "device_memory_share": 0.5}
    assert runtime_params(cfg, "neighbours") == {"chunk_size": 16384}


@pytest.mark.parametrize("files, tag", [
    ([], "digits"), ([WORKFLOW_CONFIG], "digits"), (["exp/cifar10.yaml"], "cifar10"),
    (["a.yaml", "my run.yaml"], "my_run"), (["experiments/mine/config.yaml"], "mine"),
    ([".hidden.yaml"], "hidden"),
])
def test_experiment_folder_follows_the_config_file(files, tag):
    assert experiment_tag(resolve_config({}), files) == tag
    assert experiment_tag(resolve_config({"dataset": {"tag": "mine"}}), files) == "mine"


@pytest.mark.parametrize("module, cls, section", [
    ("pipeline.latent", "LatentParams", "latent"),
    ("pipeline.neighbours", "NeighboursParams", "neighbours"),
    ("pipeline.train.params", "TrainParams", "train"),
    ("pipeline.augment", "AugmentParams", "train.augment"),
    ("pipeline.train.params", "ProbabilisticParams", "train.probabilistic"),
    ("pipeline.train.params", "WeightedParams", "train.weighted"),
    ("pipeline.train.params", "TopkParams", "train.topk"),
    ("pipeline.train.sources", "QueueParams", "train.queue"),
    ("pipeline.train.sources", "FilterParams", "train.filter"),
    ("pipeline.train.params", "ByolParams", "byol"),
    ("pipeline.train.params", "SimclrParams", "simclr"),
    ("pipeline.train.params", "NnclrParams", "nnclr"),
    ("pipeline.evaluate", "EvaluateParams", "evaluate"),
    ("pipeline.prepare", "PrepareParams", "dataset"),
])
def test_stage_dataclass_defaults_agree_with_the_schema(module, cls, section):
    """The schema is the one home of every default; the dataclasses' copies (for use from
    Python) must not drift from it."""
    import dataclasses
    import importlib

    for field in dataclasses.fields(getattr(importlib.import_module(module), cls)):
        if field.default is dataclasses.MISSING:
            continue  # nested dataclasses are checked on their own
        key, sub = field_schema(section, field.name)
        assert field.default == sub["default"], f"{cls}.{field.name} vs {key}"


@pytest.mark.parametrize("cls, flat, message", [
    ("pipeline.latent.LatentParams", {"dim": 0},
     "config key 'latent.dim': 0 is less than the minimum of 1"),
    ("pipeline.latent.LatentParams", {"prior_weight": -1.0},
     "config key 'latent.autodecoder.prior_weight': -1.0 is less than the minimum of 0"),
    ("pipeline.train.params.TrainParams", {"lr": float("nan")},
     "config key 'train.lr': nan is not a finite number"),
    ("pipeline.train.params.TrainParams", {"view2.flip_prob": 2.0},
     "config key 'train.view2.flip_prob': 2.0 is greater than the maximum of 1"),
    ("pipeline.train.params.TrainParams", {"optimizer": "adam"},
     "config key 'train.optimizer': 'adam' is not one of"),
    ("pipeline.train.params.TrainParams", {"precision": "fp16"},
     "config key 'train.precision': 'fp16' is not one of ['auto', 'fp32', 'bf16']"),
    ("pipeline.train.params.TrainParams", {"probabilistic.p_neighbour": 1.5},
     "config key 'train.probabilistic.p_neighbour': 1.5 is greater than the maximum of 1"),
    ("pipeline.train.params.TrainParams", {"queue.k": 0},
     "config key 'train.queue.k': 0 is less than the minimum of 1"),
    ("pipeline.train.params.TrainParams", {"byol.tau_base": -0.5},
     "config key 'byol.tau_base': -0.5 is less than the minimum of 0"),
    ("pipeline.train.params.TrainParams", {"simclr.temperature": 0.0},
     "config key 'simclr.temperature': 0.0 is less than or equal to the minimum of 0"),
    ("pipeline.train.params.TrainParams", {"nnclr.queue_size": 0},
     "config key 'nnclr.queue_size': 0 is less than the minimum of 1"),
])
def test_stage_params_get_the_config_message_from_any_entry_point(cls, flat, message):
    """`python -m pipeline <stage> --params ...` and Python callers see what config.yaml
    would have said."""
    import importlib

    module, name = cls.rsplit(".", 1)
    with pytest.raises(PipelineError) as err:
        build(getattr(importlib.import_module(module), name), flat)
    assert str(err.value).startswith(message)
    flat_key = next(iter(flat))
    nested: dict = {}
    *parents, leaf = message.split("'")[1].split(".")
    cursor = nested
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[leaf] = flat[flat_key]
    with pytest.raises(PipelineError) as via_config:
        validate_config(nested)
    assert str(via_config.value) == str(err.value)


# The hand-written pages that restate defaults (docs/configuration.md is generated).
MANUAL = ("README.md", "docs/method.md", "docs/running.md")


def _readme_key_tables():
    """(section, key, default text) of every `| key | default | meaning |` table in the README;
    the section comes from the nearest heading or bold line naming `section:`."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = "\n".join((root / f).read_text() for f in MANUAL)
    rows, section, in_table = [], "", False
    for line in readme.splitlines():
        named = re.search(r"`(\w+):`", line)
        if named and not line.startswith("|"):
            section = named.group(1)
        if line.startswith("| key | default |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            in_table = False
        cells = [c.strip() for c in line.strip("|").split("|")]
        if in_table and len(cells) >= 3 and cells[0].startswith("`"):
            rows.append((section if readme_has_section(section) else "", cells[0], cells[1]))
    return rows


def readme_has_section(name: str) -> bool:
    return name in load_schema()["properties"]


def _number(value):
    if isinstance(value, list):
        return [_number(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return value
    return value


def _as_value(text: str):
    import yaml

    return _number(yaml.safe_load(text))


def _schema_default(dotted: str):
    """The schema default of a dotted key, or KeyError when it is not a key."""
    sub = load_schema()
    for part in dotted.split("."):
        sub = sub["properties"][part]
    return sub["default"]


def _readme_inline_defaults():
    """(dotted key, default text) of every "`section.key` (default ...)" the README writes,
    e.g. "`simclr.temperature` (0.2)": one value (a number, word or list) that the first
    ',', ':' or ')' ends, so prose in parentheses is not read as a default."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = "\n".join((root / f).read_text() for f in MANUAL)
    found = []
    value = r"[-+\w.]+|\[[^\]]*\]"
    for key, text in re.findall(rf"`([a-z_]+(?:\.[a-z_0-9]+)+)` \(({value})[,:)]", readme):
        try:
            _schema_default(key)
        except KeyError:
            continue  # a file name such as `state.pt`
        found.append((key, text.strip()))
    return found


def test_readme_key_tables_agree_with_the_schema():
    """The README restates defaults for reading; this guards the copy against drift. Its
    key tables moved to docs/configuration.md, which is generated from the schema
    (tests/test_configdocs.py); any table left in the README, and every default written
    inline beside a key, must still agree."""
    import re

    checked = 0
    for section, keys, default in _readme_key_tables():
        names = re.findall(r"`([\w.]+)`", keys)
        if not names or "*" in keys or "<" in keys or default in ("", "–"):
            continue
        values = _as_value(f"[{default.replace('`', '')}]")
        if len(values) != len(names):
            values = [_as_value(default.replace("`", ""))]
        assert len(values) == len(names), (keys, default)
        for name, value in zip(names, values, strict=True):
            dotted = name if "." in name and name.split(".")[0] in load_schema()[
                "properties"] else f"{section}.{name}".strip(".")
            assert value == _schema_default(dotted), f"README {dotted}: {value!r}"
            checked += 1
    for key, text in _readme_inline_defaults():
        assert _as_value(text) == _schema_default(key), f"README {key}: {text!r}"
        checked += 1
    assert checked >= 5


TAG_WORDS = ("is not a folder name; use letters, digits, '-', '_' or '.', not starting with '.' "
             "(e.g. 'mnist-small')")


@pytest.mark.parametrize("tag", [".", "..", "", "a/b", "a\\b", ".hidden", "../up", "my run"])
def test_a_tag_that_is_not_a_folder_name_is_refused_in_words(tag):
    with pytest.raises(PipelineError) as err:
        resolve_config({"dataset": {"tag": tag}})
    assert str(err.value) == f"config key 'dataset.tag': {tag!r} {TAG_WORDS}"
    # The prepare stage's own entry point says the same.
    from pipeline.prepare import PrepareParams

    with pytest.raises(PipelineError) as via_params:
        build(PrepareParams, {"tag": tag})
    assert str(via_params.value) == str(err.value)


@pytest.mark.parametrize("tag", ["mnist-small", "007", "run_1.v2", "a..b", "x."])
def test_folder_name_tags_are_accepted(tag):
    assert resolve_config({"dataset": {"tag": tag}})["dataset"]["tag"] == tag


@pytest.mark.parametrize("train, message", [
    ({"epochs": 3, "warmup_epochs": 5},
     "config key 'train.warmup_epochs': 5 must be less than train.epochs (3); the learning "
     "rate would never reach train.lr; lower it (0 = no warm-up) or raise train.epochs"),
    ({"epochs": 3, "warmup_epochs": 3},
     "config key 'train.warmup_epochs': 3 must be less than train.epochs (3); the learning "
     "rate would reach train.lr only on the last step and never decay; lower it (0 = no "
     "warm-up) or raise train.epochs"),
    ({"epochs": 1},  # the default warm-up of 2 epochs
     "config key 'train.warmup_epochs': 2 must be less than train.epochs (1); the learning "
     "rate would never reach train.lr; lower it (0 = no warm-up) or raise train.epochs"),
    ({"epochs": 4, "neighbour_warmup_epochs": 4},
     "config key 'train.neighbour_warmup_epochs': 4 must be less than train.epochs (4); the "
     "neighbours' share would never reach its set value; lower it (0 = full from the start) "
     "or raise train.epochs"),
    ({"epochs": 4, "neighbour_warmup_epochs": 9, "uses": ["baseline", "topk"]},
     "config key 'train.neighbour_warmup_epochs': 9 must be less than train.epochs (4)"),
])
def test_a_warm_up_as_long_as_training_is_refused(train, message):
    with pytest.raises(PipelineError) as err:
        resolve_config({"train": train})
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("train", [
    {"epochs": 3, "warmup_epochs": 2, "neighbour_warmup_epochs": 2},
    {"epochs": 1, "warmup_epochs": 0},
    {"epochs": 1, "warmup_epochs": 0, "neighbour_warmup_epochs": 0},
    # Baseline runs never read the neighbours' ramp, so a baseline-only grid ignores it.
    {"epochs": 2, "warmup_epochs": 1, "neighbour_warmup_epochs": 5, "uses": ["baseline"]},
])
def test_a_warm_up_shorter_than_training_is_accepted(train):
    cfg = resolve_config({"train": train})
    assert {k: cfg["train"][k] for k in train} == train


@pytest.mark.parametrize("text, message", [
    ("seed: 0\nlatent:\n  dim: 4\nseed: 1\n",
     "config file 'exp.yaml': key 'seed' appears twice (lines 1 and 4); keep one"),
    ("seed: 0\ntrain:\n  lr: 0.01\n  epochs: 5\n  lr: 0.02\n",
     "config file 'exp.yaml': key 'train.lr' appears twice (lines 3 and 5); keep one"),
    ("train: {lr: 0.01, lr: 0.02}\n",
     "config file 'exp.yaml': key 'train.lr' appears twice (lines 1 and 1); keep one"),
    ("train:\n  view1: {blur_prob: 1.0}\n  view1:\n    blur_prob: 0.5\n",
     "config file 'exp.yaml': key 'train.view1' appears twice (lines 2 and 3); keep one"),
    ("seed: 0\n'seed': 1\n",
     "config file 'exp.yaml': key 'seed' appears twice (lines 1 and 2); keep one"),
    ('{\n\t"seed": 0,\n\t"latent": {"dim": 4, "dim": 8}\n}\n',
     "config file 'exp.yaml': key 'latent.dim' appears twice (lines 3 and 3); keep one"),
    ("- seed: 0\n- seed: 1\n",
     "config file 'exp.yaml': the top level is a list, not a mapping of keys to values "
     "(e.g. 'seed: 0')"),
    ("just words\n",
     "config file 'exp.yaml': the top level is a string, not a mapping of keys to values "
     "(e.g. 'seed: 0')"),
    ("seed: 0\nlatent: {dim: 4\n",
     "config file 'exp.yaml': not valid YAML at line 3, column 1: expected ',' or '}', but got "
     "'<stream end>' (while parsing a flow mapping at line 2)"),
    ("seed: 0\n\tlatent: {dim: 4}\n",
     "config file 'exp.yaml': not valid YAML at line 2, column 1: found character '\\t' that "
     "cannot start any token (while scanning for the next token)"),
    ("latent:\n  dim: 4\n epochs: 2\n",
     "config file 'exp.yaml': not valid YAML at line 3, column 2: expected <block end>, but "
     "found '<block mapping start>' (while parsing a block mapping at line 1)"),
])
def test_a_config_file_yaml_would_misread_is_refused_in_one_line(tmp_path, monkeypatch, text,
                                                                  message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(PipelineError) as err:
        read_config_file("exp.yaml")
    assert str(err.value) == message


@pytest.mark.parametrize("text, config", [
    ("", {}),
    ("# only a comment\n", {}),
    ("seed: 3\ntrain: {lr: 0.01, epochs: 5}\nlatent:\n  vae: {epochs: 4}\n  ae: {epochs: 4}\n",
     {"seed": 3, "train": {"lr": 0.01, "epochs": 5}, "latent": {"vae": {"epochs": 4},
                                                                 "ae": {"epochs": 4}}}),
    ('{\n\t"seed": 3,\n\t"train": {"lr": 1e-3}\n}\n', {"seed": 3, "train": {"lr": 0.001}}),
    ("base: &b {lr: 0.01}\nother:\n  <<: *b\n  lr: 0.02\n",
     {"base": {"lr": 0.01}, "other": {"lr": 0.02}}),
])
def test_a_well_formed_config_file_reads_as_yaml_does(tmp_path, text, config):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    assert read_config_file(path) == config


def test_every_shipped_config_and_preset_reads_strictly_and_resolves():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [root / "config.yaml", *sorted((root / "config").glob("*.yaml"))]
    assert len(files) > 1
    for path in files:
        cfg = resolve_config(read_config_file(path))
        assert cfg["train"]["warmup_epochs"] < cfg["train"]["epochs"], path
    for name in presets():
        assert resolve_config({**load_preset(name), "preset": "none"})


def test_a_preset_is_read_as_strictly_as_a_config_file(tmp_path, monkeypatch):
    import pipeline.config

    (tmp_path / "twice.yaml").write_text("train:\n  batch_size: 64\n  batch_size: 32\n")
    monkeypatch.setattr(pipeline.config, "PRESETS", tmp_path)
    with pytest.raises(PipelineError) as err:
        resolve_config({"preset": "twice"})
    assert str(err.value) == (f"config file {str(tmp_path / 'twice.yaml')!r}: key "
                              "'train.batch_size' appears twice (lines 2 and 3); keep one")


# ------------------------------------------------------------------- methods and uses


def test_an_old_layout_config_is_refused_in_one_line_naming_what_moved():
    with pytest.raises(PipelineError) as err:
        validate_config({"byol": {"variants": ["baseline", "weighted"], "epochs": 3}})
    assert str(err.value) == (
        "config: the training keys moved from byol: to train: (shared by every method; byol: "
        "keeps only tau_base): byol.epochs -> train.epochs, byol.variants -> train.uses")
    # At most four keys are named; the queue source's params moved under their new name.
    with pytest.raises(PipelineError) as err:
        validate_config({"byol": {"online": {"queue_size": 64}, "sources": ["online"],
                                  "lr": 0.1, "epochs": 3, "variants": ["baseline"],
                                  "tau_base": 0.9}})
    assert str(err.value) == (
        "config: the training keys moved from byol: to train: (shared by every method; byol: "
        "keeps only tau_base): byol.epochs -> train.epochs, byol.lr -> train.lr, byol.online "
        "-> train.queue, byol.sources -> train.sources, ...; and byol.sources' online is now "
        "queue")
    # BYOL's own key stays in byol:.
    assert validate_config({"byol": {"tau_base": 0.9}})["byol"]["tau_base"] == 0.9


@pytest.mark.parametrize("config, message", [
    ({"train": {"methods": ["simclr"], "uses": ["weighted"]}},
     "config key 'train.uses': 'weighted' means nothing for train.methods ['simclr'] (simclr "
     "takes ['baseline', 'probabilistic']); add byol to train.methods or drop 'weighted'"),
    ({"train": {"methods": ["simclr", "nnclr"], "uses": ["baseline", "topk"]}},
     "config key 'train.uses': 'topk' means nothing for train.methods ['simclr', 'nnclr'] "
     "(simclr takes ['baseline', 'probabilistic']; nnclr takes ['baseline']); add byol to "
     "train.methods or drop 'topk'"),
    ({"train": {"methods": ["nnclr"], "uses": ["baseline"], "batch_size": 64},
      "nnclr": {"queue_size": 32}},
     "config key 'nnclr.queue_size': 32 is smaller than the batch (64); the queue must hold "
     "at least one batch of earlier projections"),
    ({"simclr": {"temperature": 0}},
     "config key 'simclr.temperature': 0 is less than or equal to the minimum of 0"),
    ({"nnclr": {"temperature": -0.1}},
     "config key 'nnclr.temperature': -0.1 is less than or equal to the minimum of 0"),
])
def test_method_combinations_and_keys_that_mean_nothing_are_refused(config, message):
    with pytest.raises(PipelineError) as err:
        resolve_config(config)
    assert str(err.value) == message


def test_a_method_and_use_grid_that_means_something_is_accepted():
    # A use that one listed method takes is fine; the others simply skip it.
    cfg = resolve_config({"train": {"methods": ["simclr", "byol"], "uses": ["weighted"]}})
    assert [r.name for r in runs(cfg)] == [
        "byol-weighted-autodecoder-euclidean", "byol-weighted-autodecoder-cosine",
        "byol-weighted-ae-euclidean", "byol-weighted-ae-cosine",
        "byol-weighted-vae-euclidean", "byol-weighted-vae-cosine"]
    # NNCLR's queue is only checked when NNCLR trains.
    resolve_config({"train": {"batch_size": 64}, "nnclr": {"queue_size": 32}})
    resolve_config({"train": {"methods": ["nnclr"], "uses": ["baseline"], "batch_size": 64},
                    "nnclr": {"queue_size": 64}})


def test_a_method_section_changes_only_that_methods_runs():
    cfg = validate_config({})
    changed = validate_config({"simclr": {"temperature": 0.5}})
    for run in (Run("byol"), Run("byol", "probabilistic", "latent", "ae", "cosine"),
                Run("nnclr")):
        assert train_params(cfg, run) == train_params(changed, run), run.name
    for run in (Run("simclr"), Run("simclr", "probabilistic", "latent", "ae", "cosine")):
        before, after = train_params(cfg, run), train_params(changed, run)
        assert before != after and (before["simclr.temperature"], after["simclr.temperature"]
                                    ) == (0.2, 0.5), run.name
    # Likewise a use's section: weighted runs only.
    changed = validate_config({"train": {"weighted": {"pos_weight": 0.9}}})
    assert train_params(cfg, Run("byol", "probabilistic", "latent", "ae", "cosine")) == \
        train_params(changed, Run("byol", "probabilistic", "latent", "ae", "cosine"))
    assert train_params(cfg, Run("byol", "weighted", "latent", "ae", "cosine")) != \
        train_params(changed, Run("byol", "weighted", "latent", "ae", "cosine"))


def test_the_grid_of_three_methods_and_three_uses_has_exactly_these_runs():
    cfg = resolve_config({"latent": {"models": ["ae", "vae"]},
                          "neighbours": {"metrics": ["cosine"]},
                          "train": {"methods": ["byol", "simclr", "nnclr"],
                                    "uses": ["baseline", "probabilistic", "weighted"]}})
    assert [r.name for r in runs(cfg)] == [
        "byol-baseline",
        "byol-probabilistic-ae-cosine", "byol-probabilistic-vae-cosine",
        "byol-weighted-ae-cosine", "byol-weighted-vae-cosine",
        "simclr-baseline",
        "simclr-probabilistic-ae-cosine", "simclr-probabilistic-vae-cosine",
        "nnclr-baseline",
    ]
    # Refresh rounds and the queue source add their runs to every neighbour use.
    cfg = resolve_config({"latent": {"models": ["ae"]}, "neighbours": {"metrics": ["cosine"]},
                          "train": {"methods": ["byol", "simclr", "nnclr"],
                                    "uses": ["baseline", "probabilistic", "weighted"],
                                    "sources": ["latent", "queue"], "refresh_rounds": 2,
                                    "queue": {"queue_size": 256}}})
    assert [r.name for r in runs(cfg)] == [
        "byol-baseline",
        "byol-probabilistic-ae-cosine", "byol-probabilistic-ae-cosine-r2",
        "byol-probabilistic-queue",
        "byol-weighted-ae-cosine", "byol-weighted-ae-cosine-r2", "byol-weighted-queue",
        "simclr-baseline",
        "simclr-probabilistic-ae-cosine", "simclr-probabilistic-ae-cosine-r2",
        "simclr-probabilistic-queue",
        "nnclr-baseline",
    ]
    names = [r.name for r in runs(cfg)]
    assert len(set(names)) == len(names)
