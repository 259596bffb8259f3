"""Every bench script runs end to end at tiny sizes, so none can rot unnoticed."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_scripts_all_have_a_smoke_test():
    tested = {"bench_byol", "bench_knn", "bench_neighbours", "bench_lightly", "bench_latent",
              "bench_revisions"}
    assert {p.stem for p in BENCH.glob("bench_*.py")} == tested


def test_bench_knn_smoke(capsys, one_thread):
    assert _load("bench_knn").main(["--n", "300", "--d", "8", "--k", "3", "--threads", "1",
                                    "--backends", "faiss-cpu", "sklearn"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("300")]
    assert [r[1] for r in rows] == ["faiss-cpu", "sklearn"]
    assert all(float(r[2]) >= 0 for r in rows)
    assert rows[1][4] == "1.000"  # sklearn finds exactly FAISS's neighbours


def test_bench_byol_throughput_smoke(capsys, one_thread):
    _load("bench_byol").main(["--device", "cpu", "--batch-size", "8", "--steps", "1",
                              "--warmup", "1", "--workers", "0", "--cases", "smallconv:8:1",
                              "--layouts", "channels_last", "contiguous",
                              "--precisions", "fp32", "bf16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("smallconv:8:1")]
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (layout, precision, "eager") for layout in ("channels_last", "contiguous")
        for precision in ("fp32", "bf16")]
    assert all(float(v) > 0 for r in rows for v in r[4:])
    assert rows[0][-1] == "1.00"  # each row's e2e against the first one's


def test_bench_latent_smoke(capsys, one_thread):
    assert _load("bench_latent").main([
        "--size", "8", "--models", "ae", "autodecoder", "--batch-size", "8", "--steps", "1",
        "--warmup", "0", "--infer-steps", "3", "0", "--epochs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.split()[:1] in (["ae"], ["autodecoder"])]
    assert [(r[0], r[2]) for r in rows] == [
        ("ae", "channels_last"), ("ae", "contiguous"),
        ("autodecoder", "channels_last"), ("autodecoder", "contiguous")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    infer = {(r.split()[0], int(r.split()[1])): [float(v) for v in r.split()[2:]] for r in out
             if r.startswith(("ridge ", "zero "))}
    assert set(infer) == {("ridge", 3), ("ridge", 0), ("zero", 3), ("zero", 0)}
    assert infer["zero", 0][0] < infer["zero", 3][0]  # no steps cost less than three
    assert infer["zero", 3][2] < infer["zero", 0][2]  # and fit the test images worse


def test_bench_byol_placements_smoke(capsys):
    _load("bench_byol").main(["--device", "cpu", "--batch-size", "8", "--steps", "2",
                              "--warmup", "1", "--cases", "smallconv:8:1",
                              "--placements", "1x1", "2x1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("smallconv:8:1")]
    assert [r[1] for r in rows] == ["1x1", "2x1"]
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3] == "1.00"


@pytest.mark.slow
def test_bench_byol_accuracy_smoke(capsys, one_thread):
    _load("bench_byol").main(["--device", "cpu", "--accuracy", "--epochs", "1",
                              "--max-train", "120", "--params",
                              '{"batch_size": 32, "warmup_epochs": 0}'])
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[2]) for line in out.splitlines()
            if line.startswith("  ")}
    assert set(rows) == {"untrained", "baseline", "probabilistic", "weighted", "topk"}
    assert all(0 < v <= 1 for v in rows.values())


def test_bench_neighbours_reads_an_experiments_tables(tmp_path, capsys):
    import pandas as pd

    results = tmp_path / "results" / "mine"
    results.mkdir(parents=True)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("dataset: {name: digits}\n")  # the tag is the config file's stem
    byol = {"dataset": "digits", "stage": "byol", "n_seeds": 3, "top1_std": 0.01,
            "knn20_top1_mean": 0.5, "knn20_top1_std": 0.02}
    pd.DataFrame([
        {**byol, "run": "byol-baseline", "latent": None, "top1_mean": 0.6},
        {**byol, "run": "byol-topk-ae-cosine-r2", "latent": "ae-r2", "top1_mean": 0.62,
         "top1_diff": 0.02, "top1_diff_ci95_low": -0.01, "top1_diff_ci95_high": 0.05},
        {"dataset": "digits", "run": "pixels", "stage": "pixels", "top1_mean": 0.4},
    ]).to_csv(results / "summary.csv", index=False)
    pd.DataFrame([{"run": r, "stage": "byol", "seed": s, "train_seconds": 10.0 * (s + 1),
                   "neighbour_purity": p}
                  for r, p in (("byol-baseline", ""), ("byol-topk-ae-cosine-r2", 0.8))
                  for s in range(3)]).to_csv(results / "linear_eval.csv", index=False)
    assert _load("bench_neighbours").main(["--configfile", str(cfg), "--root",
                                           str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("baseline", "topk"))}
    assert set(rows) == {"baseline", "topk-ae-cosine-r2"}
    assert "0.620 +- 0.010" in rows["topk-ae-cosine-r2"]
    assert "+0.020 [-0.010, +0.050]" in rows["topk-ae-cosine-r2"]
    assert rows["topk-ae-cosine-r2"].split()[-2:] == ["0.800", "20"]


LIGHTLY_TINY = ["--epochs", "2", "--probe-every", "1", "--threads", "1", "--workers", "0",
                "--max-train", "200"]


def _arm_rows(out):
    return {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("ours ", "lightly "))}


def test_bench_lightly_our_arm_runs_without_lightly(capsys, one_thread):
    assert _load("bench_lightly").main([*LIGHTLY_TINY, "--arms", "ours"]) == 0
    row = _arm_rows(capsys.readouterr().out)["ours"]
    assert float(row[1]) > 0 and 0.3 < float(row[4]) <= 1.0  # img/s, top-1 on digits
    # a probe after each epoch; the last one is the final top-1 (printed to 3 and 4 places)
    assert [p.split(":")[0] for p in row[6:]] == ["1", "2"]
    assert abs(float(row[7][2:]) - float(row[4])) < 0.00051


def test_bench_lightly_reads_an_npz_with_the_pipelines_reader(tmp_path, capsys, one_thread):
    x = np.random.default_rng(0).integers(0, 256, (60, 8, 8), dtype=np.uint8)
    y = np.arange(60) % 3
    np.savez(tmp_path / "tiny.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:],
             y_test=y[40:])
    assert _load("bench_lightly").main([
        "--npz", str(tmp_path / "tiny.npz"), "--batch-size", "16", "--epochs", "1",
        "--probe-every", "1", "--threads", "1", "--workers", "0", "--arms", "ours"]) == 0
    out = capsys.readouterr().out
    assert "40 training images 8x8x1" in out
    assert _arm_rows(out)["ours"][6].startswith("1:")


def test_bench_lightly_says_how_to_install_lightly(monkeypatch, one_thread):
    from pipeline import PipelineError

    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly -> ImportError
    with pytest.raises(PipelineError, match=r'^the lightly arm needs lightly: pip install -e '
                                            r'"\.\[cpu,peer\]"$'):
        _load("bench_lightly").main([*LIGHTLY_TINY, "--arms", "lightly"])


def test_bench_lightly_both_arms(capsys, one_thread):
    pytest.importorskip("lightly", reason="optional peer benchmark: pip install -e .[cpu,peer]")
    assert _load("bench_lightly").main(LIGHTLY_TINY) == 0
    out = capsys.readouterr().out
    assert set(_arm_rows(out)) == {"ours", "lightly"}
    assert "ours/lightly images/s:" in out


def test_bench_revisions_times_each_stage_per_revision(capsys):
    # The working tree twice: both exports run the same code, so both rows are real rates.
    assert _load("bench_revisions").main([
        "--revisions", "WORKTREE", "WORKTREE", "--stages", "latent-ae", "byol", "--n", "64",
        "--size", "12", "--epochs", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("latent-ae ", "byol "))]
    assert [(r[0], r[1]) for r in rows] == [("latent-ae", "WORKTREE")] * 2 + [
        ("byol", "WORKTREE")] * 2
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3] == rows[2][3] == "1.00"


def test_bench_revisions_names_a_revision_git_does_not_know(capsys):
    with pytest.raises(SystemExit, match=r"^error: cannot export revision 'no-such-rev'"):
        _load("bench_revisions").main(["--revisions", "no-such-rev", "--stages", "byol",
                                       "--n", "16", "--size", "8", "--epochs", "1"])
