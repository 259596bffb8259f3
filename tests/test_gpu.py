"""The CUDA paths, end to end on a miniature pipeline; skipped (with the reason) without a GPU.

CI machines have no GPU; a machine with one runs these with the rest of the suite.
"""

import numpy as np
import pytest
import torch

from pipeline.augment import AugmentParams, augment
from pipeline.io import load_neighbours, load_prepared
from pipeline.latent import LatentParams, export_latents, train_latent
from pipeline.neighbours import NeighboursParams, find_neighbours
from pipeline.prepare import PrepareParams, SyntheticParams, prepare
from pipeline.train.encoder import encode_checkpoint
from pipeline.train.grid import Run
from pipeline.train.loop import train
from pipeline.train.params import NnclrParams, ProbabilisticParams, TrainParams, WeightedParams
from pipeline.train.sources import QueueParams, QueueSource

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
        classes=3, per_class=40, size=32, channels=3)), d / "prepared")
    return d


def test_augmentation_on_cuda_is_per_sample_and_reproducible():
    x = torch.rand(1, 3, 32, 32, device="cuda").expand(64, -1, -1, -1).contiguous()
    p = AugmentParams(blur_prob=0.5, solarize_prob=0.2)
    a = augment(x, p, torch.Generator(device="cuda").manual_seed(0))
    b = augment(x, p, torch.Generator(device="cuda").manual_seed(0))
    assert a.device.type == "cuda" and a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert (a[0] - a[1]).abs().max() > 1e-3  # same input image, different views


def test_cpu_and_cuda_draw_the_same_views_from_the_same_cpu_generator():
    """The training loop's generators are CPU ones: the same seed gives the same crops, flips,
    jitter, blur and solarisation for images on either device (up to float rounding)."""
    x = torch.rand(16, 3, 32, 32)
    p = AugmentParams(blur_prob=0.5, solarize_prob=0.2)
    on_cpu = augment(x, p, torch.Generator().manual_seed(3))
    on_cuda = augment(x.cuda(), p, torch.Generator().manual_seed(3))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_latent_neighbours_and_byol_on_cuda(tiny):
    d = tiny
    train_latent(LatentParams(dim=8, epochs=2, width=8, batch_size=32), "ae", d / "prepared",
                 d / "ae.pt", d / "ae.csv", d / "ae.png", d / "ae_recon.png", "cuda")
    export_latents(d / "ae.pt", d / "prepared", d / "latents.parquet", "cuda", "gpu-test")
    find_neighbours(NeighboursParams(k=3), d / "latents.parquet", d / "prepared", "cosine",
                    d / "nb.parquet", d / "grid.png", "cuda")
    ids, nb, dist, meta = load_neighbours(d / "nb.parquet")
    assert nb.shape == (len(ids), 3) and np.isfinite(dist).all()
    assert (nb != ids[:, None]).all()
    params = TrainParams(backbone="resnet18_cifar", epochs=2, batch_size=32, proj_dim=16,
                         proj_hidden=32, warmup_epochs=1, checkpoint_every=1,
                         weighted=WeightedParams(0.5))
    train(params, Run("byol", "weighted", "latent", "ae", "cosine"), 0, d / "prepared",
          d / "nb.parquet", d / "enc.pt", d / "state.pt", d / "hist.csv", d / "loss.png", "cuda")
    # The finished state is kept as the encoder's hard link (a re-run only rewrites outputs).
    assert (d / "enc.pt").samefile(d / "state.pt")
    data = load_prepared(d / "prepared")
    gpu_feats, summary = encode_checkpoint(d / "enc.pt", data, "cuda")
    cpu_feats, _ = encode_checkpoint(d / "enc.pt", data, "cpu")
    assert gpu_feats.shape == cpu_feats.shape == (len(data.ids), 512)
    assert summary["device"] != "cpu" and np.isfinite(summary["final_loss"])
    # Same weights on both devices: features agree up to bf16/TF32 rounding.
    rel = np.abs(gpu_feats - cpu_feats).max() / (np.abs(cpu_feats).max() + 1e-12)
    assert rel < 0.05


def test_queue_on_cuda_finds_the_cpu_neighbours():
    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator()
                                                  .manual_seed(0)), dim=-1)
    found = {}
    for dev in ("cpu", "cuda"):
        q = QueueSource(64, 16, QueueParams(queue_size=48, k=4), 1.0, torch.device(dev))
        for start in range(0, 64, 16):
            rows = torch.arange(start, start + 16, device=dev)
            q.observe(rows, z[start:start + 16].to(dev))
        found[dev] = q.lookup(torch.arange(64, device=dev)).cpu()
    assert torch.equal(found["cpu"], found["cuda"])


def test_queue_neighbour_run_trains_on_cuda(tiny, tmp_path):
    p = TrainParams(backbone="smallconv", epochs=2, batch_size=32, proj_dim=8, proj_hidden=16,
                    warmup_epochs=1, probabilistic=ProbabilisticParams(1.0),
                    queue=QueueParams(queue_size=64, k=3))
    train(p, Run("byol", "probabilistic", "queue"), 0, tiny / "prepared", None,
          tmp_path / "e.pt", tmp_path / "s.pt", tmp_path / "h.csv", tmp_path / "l.png", "cuda")
    assert torch.load(tmp_path / "e.pt", weights_only=True)["summary"]["device"].startswith(
        "cuda")


@pytest.mark.parametrize("method", ["simclr", "nnclr"])
def test_contrastive_methods_train_on_cuda_and_resume(tiny, tmp_path, monkeypatch, capsys,
                                                      method):
    """SimCLR's and NNCLR's steps on CUDA (bf16 autocast, NT-Xent in float32, NNCLR's queue
    on the device), and a resume from a checkpoint written on CUDA. cuDNN's kernels are not
    deterministic here, so the resumed run is compared loosely (the CPU test is exact)."""
    import pipeline.train.loop as loop

    p = TrainParams(backbone="resnet18_cifar", epochs=2, batch_size=32, proj_dim=16,
                    proj_hidden=32, warmup_epochs=1, checkpoint_every=1,
                    nnclr=NnclrParams(queue_size=64, k=2))

    def go(name):
        d = tmp_path / name
        train(p, Run(method), 0, tiny / "prepared", None, d / "e.pt", d / "s.pt", d / "h.csv",
              d / "l.png", "cuda")
        return torch.load(d / "e.pt", weights_only=True)

    straight = go("straight")
    assert straight["summary"]["device"].startswith("cuda")
    assert straight["summary"]["precision"] == "bfloat16"
    real_stream = loop._stream
    monkeypatch.setattr(loop, "_stream", lambda s, e, *a: (_ for _ in ()).throw(
        KeyboardInterrupt()) if e == 1 else real_stream(s, e, *a))
    with pytest.raises(KeyboardInterrupt):
        go("resumed")
    monkeypatch.setattr(loop, "_stream", real_stream)
    capsys.readouterr()
    resumed = go("resumed")
    assert "resuming from epoch 1" in capsys.readouterr().err
    losses = [[r["loss"] for r in ck["history"]] for ck in (straight, resumed)]
    assert all(np.isfinite(losses[1])) and len(losses[1]) == 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=0.05)
