"""Per-sample GPU-style augmentations: shapes, ranges, per-sample randomness, reproducibility."""

import torch

from pipeline.augment import (
    AugmentParams,
    augment,
    colour_jitter,
    crop_flip,
    gaussian_blur,
    normalise,
    random_grayscale,
    solarize,
    to_float,
)

ALL_ON = AugmentParams(blur_prob=0.5, solarize_prob=0.5)


def image(channels=3, size=16, seed=0):
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_same_image_repeated_gives_different_views_and_same_seed_same_views():
    x = image().repeat(32, 1, 1, 1)
    a = augment(x, ALL_ON, torch.Generator().manual_seed(7))
    b = augment(x, ALL_ON, torch.Generator().manual_seed(7))
    c = augment(x, ALL_ON, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Per-sample draws: no two views of the one image are the same.
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(32) * 1e9).min() > 1e-3
    assert a.min() >= 0 and a.max() <= 1


def test_grey_images_keep_one_channel_and_range():
    x = image(channels=1, size=8).repeat(16, 1, 1, 1)
    out = augment(x, ALL_ON, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 8, 8)
    assert 0 <= out.min() and out.max() <= 1
    assert len({round(float(v), 5) for v in out.mean((1, 2, 3))}) == 16


def test_full_crop_without_flip_is_identity():
    x = image()
    out = crop_flip(x.repeat(4, 1, 1, 1), min_scale=1.0, flip_prob=0.0,
                    g=torch.Generator().manual_seed(0))
    # Scale 1 forces a square full-image window; aspect draws are clamped to the image.
    assert torch.allclose(out, x.expand(4, -1, -1, -1), atol=1e-5)


def test_flip_with_full_crop_mirrors_exactly():
    x = image()
    out = crop_flip(x, min_scale=1.0, flip_prob=1.0, g=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.flip(-1), atol=1e-5)


def test_jitter_grey_solarize_blur_probabilities():
    g = torch.Generator().manual_seed(0)
    x = image(size=8).repeat(8, 1, 1, 1)
    assert torch.equal(colour_jitter(x, 0.0, 0.4, g), x)
    grey = random_grayscale(x, 1.0, g)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(grey[:, 0], expected, atol=1e-6)
    sol = solarize(x, 1.0, g)
    assert torch.allclose(sol, torch.where(x >= 0.5, 1 - x, x))
    const = torch.full((4, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.0, g), const, atol=1e-6)  # blur keeps constants
    noisy = image(size=16).repeat(4, 1, 1, 1)
    assert gaussian_blur(noisy, 1.0, g).std() < noisy.std()


def test_to_float_and_normalise():
    u8 = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)  # (1, H=1, W=1, C=2)
    x = to_float(u8)
    assert x.shape == (1, 2, 1, 1) and x.flatten().tolist() == [0.0, 1.0]
    out = normalise(x, torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.5]))
    assert out.flatten().tolist() == [-2.0, 1.0]


def test_draws_come_from_the_generator_wherever_the_images_are():
    """``rand`` draws on the generator's device and moves the result, so a CPU generator's
    stream does not depend on where the images live (the CUDA half is in test_gpu.py)."""
    from pipeline.augment import rand

    g = torch.Generator().manual_seed(5)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(rand(6, g, "cpu"), expected)
    meta = rand(6, torch.Generator().manual_seed(5), "meta")  # any target device
    assert meta.device.type == "meta" and meta.shape == (6,)


def test_a_shard_gets_exactly_its_rows_of_the_whole_batchs_views():
    """A training process draws every parameter for the global batch and augments only its
    rows: bit for bit the rows one process makes (pipeline.train.distributed)."""
    from pipeline.augment import Shard

    for channels in (1, 3):
        x = torch.rand(8, channels, 12, 12, generator=torch.Generator().manual_seed(1))
        whole = augment(x, ALL_ON, torch.Generator().manual_seed(2))
        for start, stop in [(0, 4), (4, 8), (2, 3)]:
            part = augment(x[start:stop], ALL_ON, torch.Generator().manual_seed(2),
                           Shard(start, stop, 8))
            assert torch.equal(part, whole[start:stop])
