"""GPU slot claims on a multi-GPU host, with fake devices on the CPU."""

from __future__ import annotations

import multiprocessing as mp
import os
import types

import pytest
import torch

from pipeline import PipelineError, device


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """A host with four visible GPUs (no UUIDs) and a private lock folder."""

    held: list[int] = []

    def with_gpus(n: int = 4):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: types.SimpleNamespace(name=f"fake{i}"))
        monkeypatch.setenv("NNBYOL_GPU_LOCK_DIR", str(tmp_path / "slots"))
        monkeypatch.setattr(device, "_HELD", held)
        monkeypatch.setattr(device, "_CLAIMED", None)
        monkeypatch.setattr(device, "CLAIM_WAIT_S", 30.0)
        return tmp_path / "slots"

    yield with_gpus
    for fd in held:  # this test process lives on: give its claims back
        os.close(fd)


def _claim_and_hold(count, out, release):
    """Child process: claim, report the indices, hold them until told to exit."""
    out.put([d.index for d in device.claim_devices("auto", count)])
    release.wait(60)


def _spawn(ctx, count, out, release):
    p = ctx.Process(target=_claim_and_hold, args=(count, out, release))
    p.start()
    return p


def test_cpu_and_explicit_devices_are_honoured(fake_gpus):
    assert device.claim_devices("cpu", 3) == [torch.device("cpu")] * 3
    fake_gpus(4)
    assert device.claim_devices("cuda:2", 1) == [torch.device("cuda", 2)]
    assert device._HELD == []  # an explicit device takes no slot


def test_auto_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.claim_devices("auto", 2) == [torch.device("cpu")] * 2
    with pytest.raises(PipelineError, match="^device 'cuda' requested but CUDA is not available$"):
        device.claim_devices("cuda", 1)


def test_one_gpu_is_shared_unclaimed(fake_gpus):
    fake_gpus(1)
    assert device.claim_devices("auto", 1) == [torch.device("cuda", 0)]
    assert device.claim_devices("cuda", 1) == [torch.device("cuda", 0)]
    assert device._HELD == []


def test_too_many_processes_names_the_key(fake_gpus):
    fake_gpus(2)
    with pytest.raises(PipelineError) as error:
        device.claim_devices("auto", 3)
    assert str(error.value) == "train.processes is 3 but this host has 2 visible GPU(s)"
    with pytest.raises(PipelineError, match="^device 'cuda:1' names one GPU but train.processes"):
        device.claim_devices("cuda:1", 2)


def test_claims_in_one_process_are_distinct_and_resolve_is_stable(fake_gpus):
    fake_gpus(4)
    assert device.claim_devices("auto", 2) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    first = device.resolve_device("auto")
    assert first == torch.device("cuda", 2)
    # Every later call of the same process (an evaluation loading its encoder) reuses it.
    assert device.resolve_device("cuda") == first
    assert device.claim_devices("cuda", 1) == [torch.device("cuda", 3)]


def test_concurrent_processes_never_share_a_slot_and_a_freed_one_is_reused(fake_gpus):
    fake_gpus(4)
    ctx = mp.get_context("fork")  # the children inherit the fake GPUs
    out, release = ctx.Queue(), [ctx.Event() for _ in range(4)]
    procs = [_spawn(ctx, 1, out, release[i]) for i in range(3)]
    procs.append(_spawn(ctx, 1, out, release[3]))
    got = sorted(i for _ in procs for i in out.get(timeout=30))
    assert got == [0, 1, 2, 3]
    # All four held: a fifth claim waits, and gets the slot a finished job leaves behind.
    waiter_release = ctx.Event()
    waiter = _spawn(ctx, 1, out, waiter_release)
    assert out.empty()
    release[1].set()
    procs[1].join(30)
    freed = out.get(timeout=30)
    assert len(freed) == 1 and freed[0] in got
    for ev in [*release, waiter_release]:
        ev.set()
    for p in [*procs, waiter]:
        p.join(30)
        assert p.exitcode == 0


def test_a_killed_holder_frees_its_slot(fake_gpus):
    fake_gpus(2)
    ctx = mp.get_context("fork")
    out, release = ctx.Queue(), ctx.Event()
    holder = _spawn(ctx, 2, out, release)
    assert out.get(timeout=30) == [0, 1]
    holder.kill()  # no cleanup runs: the kernel drops the locks
    holder.join(30)
    assert device.claim_devices("auto", 2) == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_all_slots_taken_ends_in_one_line(fake_gpus):
    fake_gpus(2)
    device.claim_devices("auto", 2)
    device.CLAIM_WAIT_S = 0.3
    with pytest.raises(PipelineError, match=r"^no 1 free GPU slot\(s\) of 2 on this host"):
        device.claim_devices("auto", 1)


def test_slots_are_named_by_gpu_uuid_so_jobs_with_other_gpus_never_wait(fake_gpus, monkeypatch):
    """Two SLURM jobs on one node each see their own two GPUs as cuda:0 and cuda:1."""
    slots = fake_gpus(2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=f"GPU-aaaa-{i}"))
    assert device.claim_devices("auto", 2) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=f"GPU-bbbb-{i}"))
    device.CLAIM_WAIT_S = 0.3
    assert device.claim_devices("auto", 2) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert sorted(p.name for p in slots.iterdir()) == [
        "gpu-GPU-aaaa-0.lock", "gpu-GPU-aaaa-1.lock", "gpu-GPU-bbbb-0.lock", "gpu-GPU-bbbb-1.lock"]
