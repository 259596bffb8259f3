"""Data-parallel training on the CPU with 2 gloo processes: a step on each process's shard
equals one process's step on the global batch, training with train.processes 2 matches
training with 1, resume, the launchers, and bad input."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import IDS, as_run, history, weights, write_data, write_neighbours

from pipeline import PipelineError
from pipeline.augment import Shard
from pipeline.config import resolve_config
from pipeline.train.distributed import ALONE, World, launch, launcher, sync_batchnorm
from pipeline.train.encoder import init_encoder
from pipeline.train.loop import train
from pipeline.train.methods import build_method
from pipeline.train.methods.nnclr import NNCLR
from pipeline.train.params import NnclrParams, QueueParams, TopkParams, TrainParams
from pipeline.train.sources import QueueSource
from pipeline.train.uses import USES, Streams, Views

N, B, K = 16, 8, 3  # images, global batch, neighbours per image
# A gradient tensor's error relative to its norm: float32 sums in another order (and synced
# BatchNorm's statistics combined from the shards'), nothing else differs; measured below
# 3e-6. A bias just before a BatchNorm has a true gradient of 0 (BatchNorm removes any
# shift) and a float32 one of about 1e-7: those agree to ZERO in norm.
REL, ZERO = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny nets: one thread per process is fastest."""


def _images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (N, 8, 8, 1)).astype(np.uint8))


def _table() -> torch.Tensor:
    return (torch.arange(N)[:, None] + torch.arange(1, K + 1)) % N


def _params(k: int) -> TrainParams:
    return TrainParams(backbone="smallconv", proj_dim=8, proj_hidden=16,
                       nnclr=NnclrParams(temperature=0.5, queue_size=16, k=k))


def _steps(method: str, use: str, k: int, sync: bool, world: World,
           shard: Shard | None = None, before_second=None) -> list[dict]:
    """Two training steps on this process's rows, as the loop takes them: each step's loss
    (the mean over the processes), the gradients averaged over the processes, and the
    NNCLR queue afterwards. No parameter update, so the steps differ only in their batch
    and in the state after_step left (BYOL's target, NNCLR's queue)."""
    params = _params(k)
    encoder = init_encoder("smallconv", 0, 1, 8)
    model = build_method(method, encoder, 16, 8, getattr(params, method), world).train()
    if sync:
        model = sync_batchnorm(model, torch.device("cpu"))
    shard = shard or world.shard(B)
    views = Views(_images(), _table(), params.view1, params.view2, lambda x: x - 0.5, shard)
    g = Streams(*(torch.Generator().manual_seed(i) for i in range(3)))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    out = []
    for step in range(2):
        if step == 1 and before_second is not None:
            before_second(model)
        idx = perm[step * B:(step + 1) * B][shard.rows]
        b = USES[use].make_batch(views, idx, g, params, 1.0)
        extra = {"n1": b.n1, "n2": b.n2, "weights": b.weights} if b.n1 else {}
        res = model.loss(b.v1, b.v2, idx, g.nb, **extra)
        model.zero_grad()
        res.loss.backward()
        world.average_gradients(model.trainable().parameters())
        model.after_step(res, idx, step, 2)
        out.append({
            "loss": world.sum(res.loss.detach().clone()) / world.size,
            "grads": {n: p.grad.clone() for n, p in model.trainable().named_parameters()},
            "z1": res.z1, "idx": idx,
            **({"queue": model.queue.clone(), "queue_rows": model.queue_rows.clone()}
               if isinstance(model, NNCLR) else {}),
        })
    return out


# What each case runs on the two processes: method, use, NNCLR's k, sync_batchnorm, scope.
CASES = {
    "byol-ghost-bn": ("byol", "baseline", 1, False, "gathered"),
    "byol-weighted-sync": ("byol", "weighted", 1, True, "gathered"),
    "simclr-probabilistic-sync": ("simclr", "probabilistic", 1, True, "gathered"),
    "nnclr-gathered-sync": ("nnclr", "baseline", 2, True, "gathered"),
    "nnclr-rank-sync": ("nnclr", "baseline", 1, True, "rank"),
}


def _ddp_cases(out_dir: Path, device: str, world: World) -> None:
    """In each of the 2 processes: every case's two steps, saved per rank."""
    results = {}
    for name, (method, use, k, sync, scope) in CASES.items():
        results[name] = _steps(method, use, k, sync, World(world.rank, world.size, scope))
    torch.save(results, out_dir / f"rank{world.rank}.pt")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Every case run once on 2 gloo processes (one spawn for the module): rank -> results."""
    out = tmp_path_factory.mktemp("ddp")
    launch(_ddp_cases, (out,), 2, 1, "gathered", "cpu")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["loss"].item() == pytest.approx(w["loss"].item(), rel=1e-5)
        assert g["grads"].keys() == w["grads"].keys()
        for name, want in w["grads"].items():
            assert (g["grads"][name] - want).norm() < REL * want.norm() + ZERO, name


def _mean(runs: list[list[dict]]) -> list[dict]:
    """The steps of one process per shard, averaged: what gradient averaging computes."""
    return [{"loss": sum(r[s]["loss"] for r in runs) / len(runs),
             "grads": {n: sum(r[s]["grads"][n] for r in runs) / len(runs)
                       for n in runs[0][s]["grads"]}} for s in range(2)]


def test_both_processes_end_each_step_with_the_same_gradients(ddp):
    for name in CASES:
        for s in range(2):
            for n, grad in ddp[0][name][s]["grads"].items():
                assert torch.equal(grad, ddp[1][name][s]["grads"][n]), (name, n)


def test_byol_step_equals_one_process_per_shard_averaged_with_per_process_batchnorm(ddp):
    """Per-process BatchNorm statistics: the reference is one process that takes each shard
    in its own pass (a ghost batch norm) and averages the gradients."""
    shards = [_steps("byol", "baseline", 1, False, ALONE, Shard(r * 4, r * 4 + 4, B))
              for r in range(2)]
    _same(ddp[0]["byol-ghost-bn"], _mean(shards))


@pytest.mark.parametrize("name", ["byol-weighted-sync", "simclr-probabilistic-sync",
                                  "nnclr-gathered-sync"])
def test_step_with_synced_batchnorm_equals_one_process_on_the_global_batch(ddp, name):
    method, use, k, _, _ = CASES[name]
    _same(ddp[0][name], _steps(method, use, k, False, ALONE))


def test_gathered_nnclr_queue_is_the_single_process_queue_on_every_process(ddp):
    single = _steps("nnclr", "baseline", 2, False, ALONE)
    for rank in range(2):
        got = ddp[rank]["nnclr-gathered-sync"][1]
        assert torch.equal(got["queue_rows"], single[1]["queue_rows"])
        torch.testing.assert_close(got["queue"], single[1]["queue"], rtol=0, atol=REL)


def test_per_rank_nnclr_queue_holds_its_own_rows_and_trains_as_one_process_with_those_queues(
        ddp):
    """queue_scope rank: after a step each process's queue holds exactly its own shard's
    projections; the next step equals one process that looks each shard's anchors up in
    that shard's queue."""
    single = _steps("nnclr", "baseline", 1, False, ALONE)
    queues = []
    for rank in range(2):
        first = ddp[rank]["nnclr-rank-sync"][0]
        rows = slice(rank * 4, rank * 4 + 4)
        assert torch.equal(first["queue_rows"][:4], single[0]["idx"][rows])
        assert (first["queue_rows"][4:] == -1).all()
        torch.testing.assert_close(first["queue"][:4],
                                   torch.nn.functional.normalize(single[0]["z1"][rows]),
                                   rtol=0, atol=REL)
        queues.append((first["queue"], first["queue_rows"]))
    assert not torch.equal(queues[0][1], queues[1][1])

    def per_shard_queues(model):
        def nearest(z, g):
            found = []
            for rank, (queue, rows) in enumerate(queues):
                model.queue.copy_(queue)
                model.queue_rows.copy_(rows)
                found.append(NNCLR.nearest(model, z[rank * 4:rank * 4 + 4], g))
            return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
        model.nearest = nearest

    reference = _steps("nnclr", "baseline", 1, False, ALONE, before_second=per_shard_queues)
    _same(ddp[0]["nnclr-rank-sync"], reference)


def test_sharded_views_are_rows_of_the_single_process_batch_for_every_use():
    """Each process draws every number for the whole batch and builds only its rows."""
    params = TrainParams(topk=TopkParams(k=3))
    images = _images()
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:B]

    def batch(use, shard):
        views = Views(images, _table(), params.view1, params.view2, lambda x: x, shard)
        g = Streams(*(torch.Generator().manual_seed(i) for i in range(3)))
        return use.make_batch(views, idx if shard is None else idx[shard.rows], g, params, 1.0)

    for name, use in USES.items():
        whole = batch(use, None)
        for start in (0, 2, 4, 6):
            part = batch(use, Shard(start, start + 2, B))
            rows = slice(start, start + 2)
            for a, b in [(part.v1, whole.v1), (part.v2, whole.v2),
                         *zip(part.n1, whole.n1, strict=True),
                         *zip(part.n2, whole.n2, strict=True)]:
                assert torch.equal(a, b[rows]), name


def test_queue_source_takes_every_query_and_queues_only_the_given_rows():
    q = QueueSource(10, 2, QueueParams(queue_size=4, k=1), 1.0, torch.device("cpu"))
    idx = torch.tensor([3, 7, 1, 5])
    q.observe(idx, torch.randn(4, 2), slice(2, 4))
    assert q.seen[idx].all()
    assert q.rows.tolist() == [1, 5, -1, -1] and q.ptr == 2


# ------------------------------------------------------------------ train(), end to end

TINY = dict(backbone="smallconv", epochs=2, batch_size=16, proj_dim=8, proj_hidden=16,
            warmup_epochs=1, checkpoint_every=1, optimizer="sgd", lr=0.05)


BYOL = as_run("byol")


def _run(tmp_path, data, name, run=BYOL, on_epoch=None, **kw):
    d = tmp_path / name
    train(TrainParams(**{**TINY, **kw}), run, 0, data, None, d / "encoder.pt", d / "state.pt",
          d / "history.csv", d / "loss.png", "cpu", on_epoch)
    return d / "encoder.pt"


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "prepared")


def test_two_processes_train_what_one_process_trains(tmp_path, data):
    """With synced BatchNorm the two runs differ only in the order of float32 sums: the
    weights after 4 SGD steps agree to 1e-4, the history's loss and spread to 1e-4."""
    one = _run(tmp_path, data, "one")
    two = _run(tmp_path, data, "two", processes=2, sync_batchnorm=True)
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    for r1, r2 in zip(history(one), history(two), strict=True):
        for col in ("loss", "spread"):
            assert float(r2[col]) == pytest.approx(float(r1[col]), rel=1e-4)
    summary = torch.load(two, weights_only=True)["summary"]
    assert summary["processes"] == 2 and summary["batch_size"] == 16


def _stop_at_epoch_2(epoch, encoder):
    if epoch == 2:
        raise RuntimeError("killed")


@pytest.mark.parametrize("run, kw", [
    (as_run("nnclr"), dict(nnclr=NnclrParams(queue_size=16, k=2))),
    (as_run("byol", "probabilistic", "queue"), dict(queue=QueueParams(queue_size=24, k=2))),
], ids=["nnclr", "byol-queue"])
def test_a_resumed_two_process_run_ends_with_the_uninterrupted_weights(tmp_path, data, run, kw):
    """Each process's own state (BatchNorm statistics, its queue under queue_scope rank) is
    in the checkpoint, so the resumed run is the uninterrupted one, bit for bit."""
    kw = dict(processes=2, queue_scope="rank", **kw)
    whole = _run(tmp_path, data, "whole", run, **kw)
    with pytest.raises(Exception, match="killed"):
        _run(tmp_path, data, "resumed", run, on_epoch=_stop_at_epoch_2, **kw)
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)["epoch"] == 1
    resumed = _run(tmp_path, data, "resumed", run, **kw)
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in history(whole)] == [r["loss"] for r in history(resumed)]


# ------------------------------------------------------------------ launchers, bad input


def test_config_refuses_a_batch_that_does_not_split_over_the_processes():
    with pytest.raises(PipelineError) as e:
        resolve_config({"train": {"batch_size": 30, "processes": 4}})
    assert str(e.value) == (
        "config key 'train.batch_size': batches of 30 images do not split into 4 equal shards "
        "(train.processes 4 x train.nodes 1); every process trains on batch_size / "
        "(processes x nodes) rows of each batch: choose a multiple of 4")


def test_bad_process_settings_fail_before_any_process_starts(tmp_path, data, monkeypatch):
    with pytest.raises(PipelineError, match="batches of 16 images do not split into 3 equal"):
        _run(tmp_path, data, "three", processes=3)
    with pytest.raises(PipelineError, match="'train.nodes': 2 nodes need a launcher"):
        _run(tmp_path, data, "nodes", nodes=2)
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(PipelineError) as e:
        _run(tmp_path, data, "torchrun", processes=2)
    assert str(e.value) == (
        "config key 'train.processes': the launcher started 4 processes, but train.processes "
        "x train.nodes is 2 x 1 = 2; start 2 per node on 1 node(s) or change the keys")
    assert not (tmp_path / "torchrun").exists()


def test_a_workers_error_is_raised_as_its_one_line(tmp_path, data):
    """A neighbours file for other images is found while loading, in every process."""
    other = write_neighbours(tmp_path / "nb.parquet", IDS + 1000)
    d = tmp_path / "bad"
    with pytest.raises(PipelineError) as e:
        train(TrainParams(**{**TINY, "processes": 2}), as_run("byol", "probabilistic"), 0,
              data, other, d / "encoder.pt", d / "state.pt", d / "history.csv",
              d / "loss.png", "cpu")
    assert str(e.value).startswith(f"neighbours file {other} is for another data set")
    assert not (d / "encoder.pt").exists()


def test_srun_tasks_meet_on_the_jobs_first_host(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'node07\\nnode08\\n'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "1234"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launcher() == (3, 4, 1, "tcp://node07:16234")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job is a plain process
    assert launcher() is None


@pytest.mark.slow
def test_two_gloo_processes_train_byol_and_nnclr_through_the_dag(tmp_path):
    """train.processes 2 through Snakemake on the CPU: BYOL and NNCLR train as one process
    does (synced BatchNorm, gathered queue): every weight within 1e-3 for BYOL, 1e-2 for
    NNCLR; the table has the same runs."""
    from conftest import Workflow, tiny_config

    grid = {"methods": ["byol", "nnclr"], "uses": ["baseline"], "seeds": [0],
            "sync_batchnorm": True, "batch_size": 16, "epochs": 2}
    tables, encoders = {}, {}
    for processes in (1, 2):
        cfg = tiny_config(latent={"models": []}, train={**grid, "processes": processes},
                          evaluate={"knn_k": [5]})
        (tmp_path / f"p{processes}").mkdir()
        wf = Workflow(tmp_path / f"p{processes}", cfg)
        wf.run("results/linear_eval.csv")
        tables[processes] = pd.read_csv(wf.path / "results" / "linear_eval.csv")
        encoders[processes] = {
            run: weights(next((wf.path / "results").glob(f"*/train/{run}/seed0/encoder.pt")))
            for run in ("byol-baseline", "nnclr-baseline")}
    assert sorted(tables[1]["run"]) == sorted(tables[2]["run"])
    for run, one in encoders[1].items():
        two = encoders[2][run]
        worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one
                    if one[k].is_floating_point())
        # NNCLR's nearest-neighbour pick is discontinuous: float-rounding differences in the
        # gathered projections can flip a near tie, so its tolerance is wider.
        assert worst < (1e-3 if run.startswith("byol") else 1e-2), (run, worst)
    trained = tables[2][tables[2]["run"].isin(["byol-baseline", "nnclr-baseline"])]
    assert (trained["processes"] == 2).all()
