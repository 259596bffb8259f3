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
              "bench_revisions", "bench_scale", "bench_ddp", "bench_startup"}
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
                              "--precisions", "fp32", "bf16", "--gemm-n", "128"])
    out = capsys.readouterr().out.splitlines()
    # the reference matrix product per precision (bf16 at 2048^3 takes minutes on some CPUs)
    assert [line.split()[1:4] for line in out if "matrix product" in line] == [
        ["float32", "matrix", "product"], ["bfloat16", "matrix", "product"]]
    assert all(float(line.split()[8]) > 0 for line in out if "matrix product" in line)
    rows = [line.split() for line in out if line.startswith("smallconv:8:1")]
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        (layout, precision, "eager", "byol") for layout in ("channels_last", "contiguous")
        for precision in ("fp32", "bf16")]
    assert all(float(v) > 0 for r in rows for v in r[5:])
    assert rows[0][-1] == "1.00"  # each row's e2e against the first one's


def test_bench_byol_puts_methods_side_by_side(capsys, one_thread):
    _load("bench_byol").main(["--device", "cpu", "--batch-size", "8", "--steps", "1",
                              "--warmup", "1", "--workers", "0", "--cases", "smallconv:8:1",
                              "--precisions", "fp32", "--methods", "byol", "simclr", "nnclr"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("smallconv:8:1")]
    assert [r[4] for r in rows] == ["byol", "simclr", "nnclr"]
    assert all(float(v) > 0 for r in rows for v in r[5:])
    # SimCLR's step has no target network and no predictor: fewer FLOPs than BYOL's
    assert float(rows[1][7]) / float(rows[1][6]) < float(rows[0][7]) / float(rows[0][6])


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
                              "--max-train", "120", "--methods", "byol", "simclr", "nnclr",
                              "--params", '{"batch_size": 32, "warmup_epochs": 0}'])
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[2]) for line in out.splitlines()
            if line.startswith("  ")}
    # every use each method takes (pipeline.train.grid.METHOD_USES), and the control
    assert list(rows) == ["untrained", "byol-baseline", "byol-probabilistic", "byol-weighted",
                          "byol-topk", "simclr-baseline", "simclr-probabilistic",
                          "nnclr-baseline"]
    assert all(0 < v <= 1 for v in rows.values())


def _experiment(root, runs):
    """A finished experiment's tables under ``root``: per-seed rows of ``runs`` ((run,
    columns, top1 per seed, purity)), summarised by the pipeline's own aggregate, and one
    Snakemake benchmark file per training job."""
    import pandas as pd

    from pipeline.aggregate import summarise

    results = root / "results" / "mine"
    (results / "benchmarks" / "train").mkdir(parents=True)
    rows = []
    for run, columns, top1, purity in runs:
        for seed, acc in enumerate(top1):
            rows.append({"dataset": "digits", "run": run, **columns, "seed": seed,
                         "top1": acc, "knn20_top1": acc - 0.1, "knn200_top1": acc - 0.2,
                         "neighbour_purity": purity, "train_seconds": 5.0})
            if columns["stage"] not in ("pixels", "untrained"):
                (results / "benchmarks" / "train" / f"{run}-seed{seed}.tsv").write_text(
                    f"s\th:m:s\tmax_rss\n{10.0 * (seed + 1)}\t0:00:10\t100.0\n")
    per_seed = pd.DataFrame(rows)
    per_seed.to_csv(results / "linear_eval.csv", index=False)
    summarise(per_seed).to_csv(results / "summary.csv", index=False)
    return results


def test_bench_neighbours_reads_an_experiment_with_every_method(tmp_path, capsys, monkeypatch):
    from pipeline.train.grid import Run

    def trained(run, top1, purity=""):
        return run.name, {"stage": run.method, **run.columns()}, top1, purity

    _experiment(tmp_path, [
        ("pixels", {"stage": "pixels"}, [0.5, 0.5, 0.5], ""),
        ("untrained", {"stage": "untrained"}, [0.4, 0.41, 0.42], ""),
        trained(Run("nnclr"), [0.58, 0.59, 0.60]),
        trained(Run("simclr", "probabilistic", "queue"), [0.64, 0.65, 0.66], 0.75),
        trained(Run("simclr"), [0.62, 0.63, 0.64]),
        trained(Run("byol", "probabilistic", "refresh", "ae", "cosine", 2), [0.61, 0.62, 0.66],
                0.8),
        trained(Run("byol"), [0.60, 0.61, 0.62]),
    ])
    cfg = tmp_path / "mine.yaml"  # the tag is the config file's stem
    cfg.write_text("dataset: {name: digits}\n"
                   "train: {methods: [byol, simclr, nnclr], uses: [baseline, probabilistic]}\n")
    bench = _load("bench_neighbours")
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    assert bench.main(["--configfile", str(cfg), "--root", str(tmp_path), "--run"]) == 0
    # --run builds the experiment with the workflow's own target, in the workflow's folder
    [(cmd, kw)] = calls
    assert cmd[-3:] == ["results/linear_eval.csv", "--configfile", str(cfg.resolve())]
    assert kw["cwd"] == tmp_path
    out = capsys.readouterr().out.splitlines()
    # grouped by method (registry order), each method's baseline first; no reference rows
    assert [line.split()[0] for line in out if line.startswith(("## ", "byol", "simclr",
                                                                    "nnclr", "untrained"))] == [
        "##", "untrained", "##", "byol-baseline", "byol-probabilistic-ae-cosine-r2", "##",
        "simclr-baseline", "simclr-probabilistic-queue", "##", "nnclr-baseline"]
    assert [line for line in out if line.startswith("## ")] == [
        "## untrained (control)", "## byol", "## simclr", "## nnclr"]
    rows = {line.split()[0]: line.split() for line in out
            if line.startswith(("byol", "simclr", "nnclr", "untrained"))}
    # run, source, versus: a neighbour run against its own method's baseline, another
    # method's baseline against byol-baseline
    assert {run: r[1:3] for run, r in rows.items()} == {
        "untrained": ["-", "-"], "byol-baseline": ["-", "-"],
        "byol-probabilistic-ae-cosine-r2": ["refresh", "byol-baseline"],
        "simclr-baseline": ["-", "byol-baseline"],
        "simclr-probabilistic-queue": ["queue", "simclr-baseline"],
        "nnclr-baseline": ["-", "byol-baseline"]}
    line = " ".join(rows["simclr-probabilistic-queue"])
    assert "0.650 +- 0.010 +0.020 [+0.020, +0.020]" in line  # linear top-1, paired diff
    assert "0.550 +- 0.010 +0.020 [+0.020, +0.020]" in line  # kNN-20 top-1, paired diff
    assert " ".join(rows["nnclr-baseline"][4:8]) == "0.590 +- 0.010 -0.020"
    # purity of the pairs used, and the training jobs' wall time (seeds: 10, 20, 30 s)
    assert rows["byol-probabilistic-ae-cosine-r2"][-2:] == ["0.800", "20"]
    assert rows["simclr-probabilistic-queue"][-2:] == ["0.750", "20"]
    assert rows["untrained"][-1] == "-"  # no training job, no benchmark file
    assert out[0].startswith("# DAG wall time: ")
    assert out[1].startswith("# mine: 6 configurations, methods byol, simclr, nnclr;")
    assert "kNN-20 top-1" in out[2]  # the smallest evaluate.knn_k


def test_bench_neighbours_times_a_run_trained_in_one_job_per_seed(tmp_path):
    """train.seeds_in_one_job writes one benchmark file for the run's seeds: its wall time
    counts per seed trained."""
    results = tmp_path / "results" / "x"
    (results / "benchmarks" / "train").mkdir(parents=True)
    (results / "benchmarks" / "train" / "byol-baseline.tsv").write_text("s\tcpu_time\n60\t50\n")
    for seed in (0, 1, 2):
        (results / "train" / "byol-baseline" / f"seed{seed}").mkdir(parents=True)
        (results / "train" / "byol-baseline" / f"seed{seed}" / "encoder.pt").touch()
    assert _load("bench_neighbours").wall_seconds(results, "byol-baseline") == 20


def test_bench_neighbours_refuses_an_old_layout_config(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("byol: {variants: [baseline]}\n")
    with pytest.raises(SystemExit, match=r"^error: config: the training keys moved from byol: "
                                         r"to train:"):
        _load("bench_neighbours").main(["--configfile", str(cfg), "--root", str(tmp_path)])


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


OLD_BYOL = """
import csv
from dataclasses import dataclass


@dataclass
class ByolParams:
    epochs: int = 30


def train_byol(params, variant, seed, data, neighbours, out, state, history, loss_plot, device):
    assert (variant, seed, neighbours, device) == ("baseline", 0, None, "cpu")
    with open(history, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["epoch", "seconds"])
        rows.writerows([e + 1, 0.5] for e in range(params.epochs))
"""


def test_bench_revisions_trains_byol_in_a_revision_from_before_the_method_seam(tmp_path):
    # A package as it was before pipeline/train/: BYOL's own train_byol in pipeline/byol.py.
    (tmp_path / "old" / "pipeline").mkdir(parents=True)
    (tmp_path / "old" / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "old" / "pipeline" / "byol.py").write_text(OLD_BYOL)
    bench = _load("bench_revisions")
    args = bench.argparse.Namespace(n=64, epochs=3, threads=1)
    rate = bench.run_stage(tmp_path / "old", "byol", args, tmp_path / "prepared",
                           tmp_path / "work")
    assert rate == 64 / 0.5  # from that revision's own per-epoch seconds
    with pytest.raises(SystemExit, match=r"this revision trains BYOL only \(pipeline/byol.py\), "
                                         r"not simclr"):
        bench.run_stage(tmp_path / "old", "simclr", args, tmp_path / "prepared",
                        tmp_path / "work2")


def test_bench_revisions_names_a_revision_git_does_not_know(capsys):
    with pytest.raises(SystemExit, match=r"^error: cannot export revision 'no-such-rev'"):
        _load("bench_revisions").main(["--revisions", "no-such-rev", "--stages", "byol",
                                       "--n", "16", "--size", "8", "--epochs", "1"])


def test_bench_scale_smoke(tmp_path, capsys):
    """Every stage of the scaling benchmark at 200 images: memory and time figures."""
    import json

    _load("bench_scale").main(["--sizes", "200", "--workdir", str(tmp_path)])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["images"] == 200 and row["images_gib"] == round(200 * 32 * 32 * 3 / 2**30, 3)
    for stage in ("prepare", "train_resident", "train_streamed", "neighbours", "evaluate"):
        assert row[stage]["seconds"] > 0 and 0 < row[stage]["peak_anon_gib"] <= \
            row[stage]["peak_rss_gib"] < 4, stage
    assert row["train_resident"]["images_per_s"] > 0 < row["train_streamed"]["images_per_s"]
    assert not (tmp_path / "n200").exists()  # removed unless --keep


def test_bench_startup_smoke(capsys):
    """Import figures and 2 encoders evaluated one process each and in one process."""
    assert _load("bench_startup").main(["--repeats", "1", "--seeds", "2",
                                        "--dataset", "synthetic"]) == 0
    out = capsys.readouterr().out.splitlines()
    figures = {name: [float(wall), float(cpu)]
               for name, wall, cpu in (line.rsplit(None, 2) for line in out[2:-1])}
    assert set(figures) >= {"interpreter (python -c pass)", "import torch",
                            "evaluate 2 encoders, one process each",
                            "evaluate 2 encoders in one process"}
    assert all(len(v) == 2 and v[0] > 0 and v[1] > 0 for v in figures.values())
    assert out[-1].startswith("one process / one each: wall ")


def test_bench_ddp_smoke(capsys):
    """1x1, 1x2 and 2 gloo processes x 1 thread on one tiny batch, and the paper estimate."""
    assert _load("bench_ddp").main(["--case", "smallconv:8:1", "--batch-size", "4", "--steps",
                                    "1", "--warmup", "1", "--repeats", "1",
                                    "--methods", "nnclr"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.split()[:1] == ["nnclr"]]
    assert [r[1] for r in rows[:3]] == ["1x1", "1x2", "2x1"]
    assert all(float(v) > 0 for r in rows[:3] for v in r[2:4])
    assert float(rows[2][4]) > 0 and float(rows[2][5]) > 0  # all-reduce and gathers, in step
    estimates = [line for line in out if line.startswith("ESTIMATE nnclr: 8 ")]
    assert len(estimates) == 3 and all(line.endswith("ms per step in communication")
                                       for line in estimates)


def test_verify_gpu_smoke_on_the_cpu(capsys):
    """The GPU verification script's code path, on the CPU with two gloo processes."""
    assert _load("verify_gpu").main(["--device", "cpu", "--images", "64", "--size", "8",
                                     "--epochs", "2", "--batch-size", "16",
                                     "--backbone", "smallconv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("PASS 1 CPU process ") for line in out) == 2
    two = [line for line in out if line.startswith("PASS 2 CPU processes ")]
    assert len(two) == 2 and all("largest weight difference" in line for line in two)
