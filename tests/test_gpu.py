"""The CUDA paths, end to end on a miniature pipeline; skipped (with the reason) without a GPU.

CI machines have no GPU; a machine with one runs these with the rest of the suite.
"""

import numpy as np
import pytest
import torch

from pipeline.augment import AugmentParams, augment
from pipeline.train.loop import ByolParams, encode_checkpoint, train_byol
from pipeline.io import load_neighbours, load_prepared
from pipeline.latent import LatentParams, export_latents, train_latent
from pipeline.neighbours import NeighboursParams, find_neighbours
from pipeline.prepare import PrepareParams, SyntheticParams, prepare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    prepare(PrepareParams(name="synthetic", synthetic=SyntheticParams(
        classes=3, per_class=40, size=32, channels=3)), d / "data.npz")
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
    train_latent(LatentParams(dim=8, epochs=2, width=8, batch_size=32), "ae", d / "data.npz",
                 d / "ae.pt", d / "ae.csv", d / "ae.png", d / "ae_recon.png", "cuda")
    export_latents(d / "ae.pt", d / "data.npz", d / "latents.parquet", "cuda", "gpu-test")
    find_neighbours(NeighboursParams(k=3), d / "latents.parquet", d / "data.npz", "cosine",
                    d / "nb.parquet", d / "grid.png", "cuda")
    ids, nb, dist, meta = load_neighbours(d / "nb.parquet")
    assert nb.shape == (len(ids), 3) and np.isfinite(dist).all()
    assert (nb != ids[:, None]).all()
    params = ByolParams(backbone="resnet18_cifar", epochs=2, batch_size=32, proj_dim=16,
                        proj_hidden=32, warmup_epochs=1, checkpoint_every=1, pos_weight=0.5)
    train_byol(params, "weighted", 0, d / "data.npz", d / "nb.parquet", d / "enc.pt",
               d / "state.pt", d / "hist.csv", d / "loss.png", "cuda")
    # The finished state is kept as the encoder's hard link (a re-run only rewrites outputs).
    assert (d / "enc.pt").samefile(d / "state.pt")
    data = load_prepared(d / "data.npz")
    gpu_feats, summary = encode_checkpoint(d / "enc.pt", data, "cuda")
    cpu_feats, _ = encode_checkpoint(d / "enc.pt", data, "cpu")
    assert gpu_feats.shape == cpu_feats.shape == (len(data.ids), 512)
    assert summary["device"] != "cpu" and np.isfinite(summary["final_loss"])
    # Same weights on both devices: features agree up to bf16/TF32 rounding.
    rel = np.abs(gpu_feats - cpu_feats).max() / (np.abs(cpu_feats).max() + 1e-12)
    assert rel < 0.05


def test_online_queue_on_cuda_finds_the_cpu_neighbours():
    from pipeline.train.sources import OnlineParams, QueueSource

    z = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator()
                                                  .manual_seed(0)), dim=-1)
    found = {}
    for dev in ("cpu", "cuda"):
        q = QueueSource(64, 16, OnlineParams(queue_size=48, k=4), 1.0, torch.device(dev))
        for start in range(0, 64, 16):
            rows = torch.arange(start, start + 16, device=dev)
            q.observe(rows, z[start:start + 16].to(dev))
        found[dev] = q.lookup(torch.arange(64, device=dev)).cpu()
    assert torch.equal(found["cpu"], found["cuda"])


def test_online_neighbour_run_trains_on_cuda(tiny, tmp_path):
    p = ByolParams(backbone="smallconv", epochs=2, batch_size=32, proj_dim=8, proj_hidden=16,
                   p_neighbour=1.0)
    p.online.queue_size, p.online.k = 64, 3
    train_byol(p, "probabilistic", 0, tiny / "data.npz", None, tmp_path / "e.pt",
               tmp_path / "s.pt", tmp_path / "h.csv", tmp_path / "l.png", "cuda",
               online_neighbours=True)
    assert torch.load(tmp_path / "e.pt", weights_only=True)["summary"]["device"].startswith(
        "cuda")
