"""SimCLR and NNCLR: NT-Xent against hand computations, the NNCLR queue, a falling loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import PipelineError
from pipeline.backbones import build_backbone
from pipeline.train.methods.heads import StepOut
from pipeline.train.methods.nnclr import NNCLR, check_queue
from pipeline.train.methods.simclr import SimCLR, nt_xent


def _nt_xent_reference(a: np.ndarray, b: np.ndarray, t: float) -> float:
    """The NT-Xent sum written out: one softmax per anchor over the other 2B - 1 vectors."""
    z = np.concatenate([a, b]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        denom = sum(math.exp(z[i] @ z[j] / t) for j in others)
        total += -math.log(math.exp(z[i] @ z[pos] / t) / denom)
    return total / (2 * n)


def _nnclr(queue_size: int = 16, k: int = 1, proj_dim: int = 16, seed: int = 0) -> NNCLR:
    torch.manual_seed(seed)
    return NNCLR(build_backbone("smallconv", 1, 8), 32, proj_dim, temperature=0.5,
                 queue_size=queue_size, k=k)


def _unit(*angles_deg: float) -> torch.Tensor:
    rad = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1).float()


# --------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_hand_computation(t):
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[2.0, 0.5], [-0.3, 1.0]])
    want = _nt_xent_reference(a.numpy(), b.numpy(), t)
    assert nt_xent(a, b, t).item() == pytest.approx(want, rel=1e-5)
    assert nt_xent(b, a, t).item() == pytest.approx(want, rel=1e-5)
    # Two orthonormal vectors, each its own pair: every anchor sees cos 1 once, cos 0 twice.
    e = torch.eye(2)
    # float32 cross-entropy subtracts logits near 1 / t: compare to an absolute tolerance.
    want = math.log(1 + 2 * math.exp(-1 / t))
    assert nt_xent(e, e, t).item() == pytest.approx(want, abs=2e-6)


def test_nt_xent_float32_from_bf16():
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(4, 3).bfloat16()
    out = nt_xent(a, b, 0.2)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_nt_xent_reference(a.float().numpy(),
                                                          b.float().numpy(), 0.2), rel=1e-5)


def test_nt_xent_low_for_pairs_high_when_shuffled():
    a = torch.eye(8) * 3.0
    low = nt_xent(a, a.clone(), 0.1).item()
    high = nt_xent(a, a.roll(1, 0), 0.1).item()  # every positive orthogonal to its anchor
    assert low == pytest.approx(math.log(1 + 14 * math.exp(-10)), abs=2e-6)
    assert low < 1e-3
    assert high > 9.0


# --------------------------------------------------------------------------- NNCLR queue


def _views(seed: int, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randn(b, 1, 8, 8, generator=g)


def test_nnclr_reduces_to_simclr_with_copies_in_queue():
    m = _nnclr().eval()  # eval BatchNorm: the same z in the test and inside ``loss``
    v1, v2 = _views(1)
    idx = torch.tensor([10, 11, 12, 13])
    with torch.no_grad():
        z1, z2 = m.projector(m.encoder(v1)), m.projector(m.encoder(v2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
    want = 0.5 * (nt_xent(z1, p2, 0.5) + nt_xent(z2, p1, 0.5))
    # Empty queue: NN(z) is z itself.
    out = m.loss(v1, v2, idx, torch.Generator())
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert out.neighbour_use.item() == 0.0 and out.pairs[0].numel() == 0
    # Exact copies of both views' unit projections: each row's nearest entry is its own copy.
    m.queue[:8] = F.normalize(torch.cat([z1, z2]), dim=-1)
    m.queue_rows[:8] = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23])
    out = m.loss(v1, v2, idx, torch.Generator())
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-6)
    # Each anchor's positive is its own earlier projection: a self pair, which the purity and
    # neighbour-use logs leave out (as every neighbour use does).
    assert out.pairs[1].tolist() == [] and out.neighbour_use.item() == 0.0
    assert out.loss.requires_grad and not out.z1.requires_grad and out.h1.shape == (4, 512)


def test_nearest_and_pairs_match_hand_count():
    m = _nnclr(queue_size=6, proj_dim=2)
    m.queue[:3] = _unit(0, 90, 180)
    m.queue_rows[:3] = torch.tensor([7, 8, 9])
    z = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-1.0, 0.05], [0.7, -0.7], [0.0, -1.0]])
    nn_z, rows = m.nearest(z, torch.Generator())
    # (0, -1) is 90 degrees from both 0 and 180: a tie, either row is right.
    assert rows[:4].tolist() == [7, 8, 9, 7] and rows[4].item() in (7, 9)
    assert torch.equal(nn_z[:4], m.queue[[0, 1, 2, 0]])

    # Through ``loss``: four directions in the queue; each anchor's row is its quadrant's.
    m.eval()
    m.queue[:4] = _unit(0, 90, 180, 270)
    m.queue_rows[:4] = torch.tensor([100, 101, 102, 103])
    v1, v2 = _views(2, b=6)
    idx = torch.arange(6) + 50
    out = m.loss(v1, v2, idx, torch.Generator())
    z1 = out.z1.double()
    quadrant = [round(math.degrees(math.atan2(y, x)) / 90) % 4 for x, y in z1.tolist()]
    assert out.pairs[0].tolist() == idx.tolist()
    assert out.pairs[1].tolist() == [100 + q for q in quadrant]
    assert out.neighbour_use.item() == 1.0


def test_fifo_enqueue_wraps():
    m = _nnclr(queue_size=5, proj_dim=2)

    def step(rows: list[int]) -> None:
        z = 3.0 * _unit(*[10.0 * r for r in rows])  # not unit length: the queue normalises
        m.after_step(StepOut(torch.tensor(0.0), torch.zeros(len(rows), 1), z),
                     torch.tensor(rows))

    step([0, 1, 2])
    assert m.queue_rows.tolist() == [0, 1, 2, -1, -1] and m.queue_ptr.item() == 3
    step([3, 4, 5])
    assert m.queue_rows.tolist() == [5, 1, 2, 3, 4] and m.queue_ptr.item() == 1
    assert torch.allclose(m.queue, _unit(50, 10, 20, 30, 40), atol=1e-6)
    step([10, 11, 12, 13, 14, 15, 16])  # larger than the queue: its last five stay
    assert m.queue_rows.tolist() == [14, 15, 16, 12, 13] and m.queue_ptr.item() == 3


def test_k_nearest_draw_is_among_k_and_seeded():
    m = _nnclr(queue_size=8, k=3, proj_dim=2)
    m.queue[:6] = _unit(0, 10, 20, 90, 180, 270)
    m.queue_rows[:6] = torch.tensor([0, 1, 2, 3, 4, 5])
    z = _unit(5).repeat(300, 1)
    _, rows = m.nearest(z, torch.Generator().manual_seed(0))
    assert set(rows.tolist()) == {0, 1, 2}
    _, again = m.nearest(z, torch.Generator().manual_seed(0))
    _, other = m.nearest(z, torch.Generator().manual_seed(1))
    assert torch.equal(rows, again) and not torch.equal(rows, other)
    # Fewer filled entries than k: the draw stays among the filled ones.
    m.queue_rows[1:] = -1
    m.queue_rows[3] = 3
    _, rows = m.nearest(z, torch.Generator().manual_seed(0))
    assert set(rows.tolist()) == {0, 3}


def test_state_dict_round_trip_gives_identical_loss():
    a = _nnclr(queue_size=12, k=2, seed=0)
    for step in range(3):
        v1, v2 = _views(10 + step)
        idx = torch.arange(4) + 4 * step
        a.after_step(a.loss(v1, v2, idx, torch.Generator().manual_seed(step)), idx)
    b = _nnclr(queue_size=12, k=2, seed=1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.queue, a.queue) and torch.equal(b.queue_rows, a.queue_rows)
    assert b.queue_ptr.item() == 0
    v1, v2 = _views(20)
    outs = [m.loss(v1, v2, torch.arange(4), torch.Generator().manual_seed(5)) for m in (a, b)]
    assert torch.equal(outs[0].loss, outs[1].loss)
    assert torch.equal(outs[0].pairs[1], outs[1].pairs[1])


# --------------------------------------------------------------------------- training


def _two_classes() -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical stripes, 8 images each, with two fixed noisy views."""
    g = torch.Generator().manual_seed(0)
    stripes = (torch.arange(8) % 2).float()
    base = torch.stack([stripes[:, None].expand(8, 8), stripes[None, :].expand(8, 8)])
    images = base.repeat_interleave(8, 0)[:, None]  # (16, 1, 8, 8)
    return (images + 0.3 * torch.randn(images.shape, generator=g),
            images + 0.3 * torch.randn(images.shape, generator=g))


@pytest.mark.parametrize("method", ["simclr", "nnclr"])
def test_loss_falls_on_tiny_problem(method):
    torch.manual_seed(0)
    enc = build_backbone("smallconv", 1, 8)
    m = SimCLR(enc, 32, 16) if method == "simclr" else NNCLR(enc, 32, 16, queue_size=32)
    opt = torch.optim.Adam(m.trainable().parameters(), lr=1e-3)
    v1, v2 = _two_classes()
    idx, g = torch.arange(16), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        out = m.loss(v1, v2, idx, g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        m.after_step(out, idx)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    if method == "simclr":
        assert out.pairs is None
    else:  # the queue is full by now; self pairs (an image's own earlier entry) are not logged
        assert 0.0 <= out.neighbour_use.item() <= 1.0 and (out.pairs[0] != out.pairs[1]).all()


# --------------------------------------------------------------------------- bad input


def test_error_messages():
    enc = build_backbone("smallconv", 1, 8)
    with pytest.raises(PipelineError) as e:
        SimCLR(enc, 32, 16, temperature=0.0)
    assert str(e.value) == "config key 'simclr.temperature': 0.0 must be greater than 0"
    cases = [
        ({"temperature": -1.0}, "config key 'nnclr.temperature': -1.0 must be greater than 0"),
        ({"queue_size": 0}, "config key 'nnclr.queue_size': 0 is less than the minimum of 1"),
        ({"k": 0}, "config key 'nnclr.k': 0 is less than the minimum of 1"),
        ({"queue_size": 4, "k": 5},
         "config key 'nnclr.k': 5 is larger than nnclr.queue_size (4)"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(PipelineError) as e:
            NNCLR(enc, 32, 16, **kwargs)
        assert str(e.value) == msg
    with pytest.raises(PipelineError) as e:
        check_queue(100, 256)
    assert str(e.value) == ("config key 'nnclr.queue_size': 100 is smaller than the batch (256); "
                            "the queue must hold at least one batch of earlier projections")
    check_queue(256, 256)
