"""Every bench script runs end to end at tiny sizes, so none can rot unnoticed."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_scripts_all_have_a_smoke_test():
    tested = {"bench_byol", "bench_knn"}
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
                              "--warmup", "1", "--workers", "0", "--cases", "smallconv:8:1"])
    row = [line.split() for line in capsys.readouterr().out.splitlines()
           if line.startswith("smallconv:8:1")]
    assert len(row) == 1 and all(float(v) > 0 for v in row[0][1:])


@pytest.mark.slow
def test_bench_byol_accuracy_smoke(capsys, one_thread):
    _load("bench_byol").main(["--device", "cpu", "--accuracy", "--epochs", "1",
                              "--max-train", "120", "--params", '{"batch_size": 32}'])
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[2]) for line in out.splitlines()
            if line.startswith("  ")}
    assert set(rows) == {"untrained", "baseline", "probabilistic", "weighted", "topk"}
    assert all(0 < v <= 1 for v in rows.values())
