"""Hostile paths, data-dependent checks and interrupts, on the real DAG in temporary copies."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from conftest import SNAKEMAKE, Workflow, tiny_config

from pipeline import PipelineError
from pipeline.config import as_param
from pipeline.io import Prepared, read_json, save_prepared
from pipeline.prepare import check_data

pytestmark = pytest.mark.slow

ENCODER = "results/synthetic/train/byol-baseline/seed0/encoder.pt"
TRAIN_LOG = "results/synthetic/logs/train/byol-baseline-seed0.log"


def test_checkout_path_with_space_and_command_runs_quoted_in_strict_mode(tmp_path):
    path = tmp_path / "a b $(touch pwned)"
    path.mkdir()
    wf = Workflow(path, tiny_config())
    # Probes of the job shell: where `pipeline` is imported from, and strict mode.
    with open(path / "Snakefile", "a") as fh:
        fh.write('\nrule probe:\n    output: "probe.txt"\n'
                 '    shell: "python -c \'import pipeline; print(pipeline.__file__)\' > {output}"\n'
                 '\nrule unset:\n    output: "unset.txt"\n'
                 '    shell: "echo $NNBYOL_NEVER_SET > {output}"\n'
                 '\nrule pipe:\n    output: "pipe.txt"\n    shell: "false | cat > {output}"\n')
    wf.run("results/synthetic/prepared", "probe.txt")
    assert (path / "probe.txt").read_text().strip() == str(path / "pipeline" / "__init__.py")
    assert "prepared 72 images" in (path / "results/synthetic/logs/prepare.log").read_text()
    proc = wf.run("--keep-going", "unset.txt", "pipe.txt", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NNBYOL_NEVER_SET: unbound variable" in out
    assert "Error in rule pipe" in out and not (path / "pipe.txt").exists()
    assert not list(tmp_path.rglob("pwned"))


def test_params_strings_hold_no_wildcard_pattern():
    text = as_param({"root": "data {x}/set{y}.npz", "seed": 0})
    assert "{x}" not in text and "{y}" not in text
    assert json.loads(text) == {"root": "data {x}/set{y}.npz", "seed": 0}


def test_root_with_braces_is_read(tmp_path):
    folder = tmp_path / "data {x}"
    folder.mkdir()
    npz = folder / "set{y}.npz"
    np.savez(npz, x_train=np.zeros((8, 5, 5), np.uint8), y_train=np.arange(8) % 2,
             x_test=np.zeros((4, 5, 5), np.uint8), y_test=np.arange(4) % 2)
    (tmp_path / "wf").mkdir()
    wf = Workflow(tmp_path / "wf", tiny_config(dataset={"name": "npz", "root": str(npz),
                                                        "tag": "braces"}))
    wf.run("results/braces/data_checked.json")
    assert read_json(tmp_path / "wf/results/braces/data_checked.json")["n_training"] == 8


def test_k_not_below_the_training_images_fails_before_any_training(tmp_path):
    wf = Workflow(tmp_path, tiny_config(neighbours={"k": 57}))
    proc = wf.run(check=False)
    assert proc.returncode != 0
    assert ("error: neighbours.k = 57 must be less than the number of training images (57) "
            "in results/synthetic/prepared") in proc.stdout + proc.stderr
    results = tmp_path / "results" / "synthetic"
    assert not (results / "data_checked.json").exists()
    trained = [p for name in ("model.pt", "neighbours.parquet", "state.pt", "encoder.pt")
               for p in results.rglob(name)]
    assert trained == []  # the untrained control waits for the check too


def test_a_single_class_set_fails_at_the_data_check_before_any_training(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", x_train=x[:30], y_train=np.zeros(30, np.int64),
             x_test=x[30:], y_test=np.zeros(10, np.int64))
    (tmp_path / "wf").mkdir()
    wf = Workflow(tmp_path / "wf", tiny_config(
        dataset={"name": "npz", "root": str(tmp_path / "one.npz")}))
    proc = wf.run(check=False)
    assert proc.returncode != 0
    assert ("error: results/npz/prepared: the labelled training images are all of one class "
            "(label 0); the evaluation needs at least 2 classes") in proc.stdout + proc.stderr
    results = tmp_path / "wf" / "results" / "npz"
    made = [p.relative_to(results) for p in results.rglob("*")
            if p.suffix in (".pt", ".parquet", ".json") and p.name != "experiment.json"
            and "prepared" not in p.parts]
    assert made == []


def prepared(path, labels, split):
    n = len(labels)
    save_prepared(path, Prepared(np.zeros((n, 4, 4, 1), np.uint8), np.asarray(labels),
                                 np.asarray(split), np.arange(n), ["a", "b"]))
    return path


def test_check_data_counts_and_refuses_unlabelled_sets(tmp_path):
    ok = prepared(tmp_path / "ok.npz", [0, 1, -1, 1, 0], ["train", "train", "unlabeled",
                                                         "test", "test"])
    assert check_data(ok, tmp_path / "ok.json", 2) == {
        "n_training": 3, "n_labelled_train": 2, "n_labelled_test": 2, "k": 2}
    with pytest.raises(PipelineError, match=r"neighbours.k = 3 must be less than the number "
                                            r"of training images \(3\)"):
        check_data(ok, tmp_path / "k.json", 3)
    bare = prepared(tmp_path / "bare.npz", [-1] * 4, ["train"] * 2 + ["test"] * 2)
    with pytest.raises(PipelineError, match=r"bare.npz: no labelled train images; the linear "
                                            r"evaluation needs labels in both train and test"):
        check_data(bare, tmp_path / "bare.json", None)
    one = prepared(tmp_path / "one.npz", [1, 1, 0, 1], ["train"] * 2 + ["test"] * 2)
    with pytest.raises(PipelineError, match=r"one.npz: the labelled training images are all of "
                                            r"one class \(label 1\); the evaluation needs at "
                                            r"least 2 classes"):
        check_data(one, tmp_path / "one.json", None)
    # A set written elsewhere (here the older single-file format) may repeat an id.
    np.savez(tmp_path / "dup.npz", images=np.zeros((5, 4, 4, 1), np.uint8),
             labels=np.asarray([0, 1, -1, 1, 0]),
             split=np.asarray(["train", "train", "unlabeled", "test", "test"]),
             ids=np.asarray([0, 1, 2, 1, 4]), classes=np.asarray(["a", "b"]))
    with pytest.raises(PipelineError, match=r"dup.npz: 1 ids appear more than once \(first: 1\)"
                                            r"; every image needs its own id"):
        check_data(tmp_path / "dup.npz", tmp_path / "dup.json", None)
    assert not any((tmp_path / f"{n}.json").exists() for n in ("k", "bare", "one", "dup"))


def wait_for(path, text, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupted_snakemake_does_not_train_a_finished_run_again(tmp_path, how):
    # One step per epoch: seconds of training, long enough to interrupt even when a busy
    # machine lets this process poll the log late (60 epochs once finished before the signal).
    epochs = 200
    wf = Workflow(tmp_path, tiny_config(train={"epochs": epochs}))
    log = tmp_path / TRAIN_LOG
    # SIGINT at its default (KeyboardInterrupt) in Snakemake, as in a terminal: a process
    # started in the background by a non-interactive shell (nohup, some CI runners) inherits
    # it ignored, and Snakemake would then finish the run as if never interrupted.
    proc = subprocess.Popen([SNAKEMAKE, "--cores", "2", ENCODER], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(log, f"epoch 3/{epochs}")
        proc.send_signal(getattr(signal, how))
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
    # Snakemake (SIGINT) or the orphaned job (kill -9) finishes the training; either way
    # Snakemake then holds the outputs for incomplete.
    wait_for(log, " wrote ")
    if how == "SIGKILL":
        wf.run("--unlock")
    wf.run("--rerun-incomplete", ENCODER)
    text = log.read_text()
    assert "training already finished" in text and "epoch 1/" not in text, text
    assert len(pd.read_csv(tmp_path / ENCODER.replace("encoder.pt", "history.csv"))) == epochs
    if how == "SIGINT":  # the rewritten outputs count as up to date (no mtime loop)
        assert wf.planned(ENCODER) == {}
    assert os.path.samefile(tmp_path / ENCODER, tmp_path / ENCODER.replace("encoder", "state"))
