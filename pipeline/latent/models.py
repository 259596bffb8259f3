"""Latent models: auto-decoder (DeepSDF, Park et al. 2019), auto-encoder, VAE (Kingma 2014)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import PipelineError

# The models' input is augment.to_float's: float32 NCHW in [0, 1] that keeps the NHWC storage
# (channels-last strides), the layout the models run in.
from pipeline.augment import to_float

# Images per forward pass when encoding or probing (no gradients kept).
ENCODE_BATCH = 1024


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 conv, halving (rounding up) until both sides <= 4.

    Level 0 is the input size; there is always at least one down-sampling level.
    """
    sizes = [(height, width)]
    while len(sizes) == 1 or max(sizes[-1]) > 4:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def level_channels(width: int, levels: int) -> list[int]:
    """Channels at levels 0..levels: ``width`` doubling per level, capped at 8x ``width``.

    The cap only bites for images of 64 px and more; it keeps 96 px models to a few M params.
    """
    return [width * 2 ** min(i, 3) for i in range(levels + 1)]


def norm_relu(channels: int) -> list[nn.Module]:
    """BatchNorm then ReLU, after every hidden conv of both encoder and decoder.

    Without normalisation the stack collapsed on dark 28x28 grey images (measured, see the
    README's latent section): at PyTorch's default init the output barely depends on the
    input, Adam moves every layer the same way at once, the sigmoid's input ran to -1,600
    within ten steps (-1e5 by step 40) and the decoder drew one black image for every input,
    with zero gradient from then on. BatchNorm normalises each channel across the batch, so
    what differs between images is the signal at unit scale from the first step. GroupNorm
    (per image) also stopped the collapse but left the common part dominant: the AE learned
    2-3x slower and the VAE's posterior collapsed on grey CIFAR-10. In eval mode (probe,
    export) the running statistics are used, so an image's latent does not depend on its
    batch.
    """
    return [nn.BatchNorm2d(channels), nn.ReLU()]


class Encoder(nn.Module):
    """Conv stem, then stride-2 3x3 convs down to <= 4x4, then a linear head.

    Args:
        image_shape: (H, W, C) of the input images.
        width: channels of the stem; doubles per level.
        out_dim: size of the output vector.
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int, out_dim: int):
        super().__init__()
        h, w, c = image_shape
        sizes = level_sizes(h, w)
        chans = level_channels(width, len(sizes) - 1)
        layers: list[nn.Module] = [nn.Conv2d(c, chans[0], 3, padding=1), *norm_relu(chans[0])]
        for i in range(1, len(sizes)):
            layers += [nn.Conv2d(chans[i - 1], chans[i], 3, stride=2, padding=1),
                       *norm_relu(chans[i])]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(chans[-1] * sizes[-1][0] * sizes[-1][1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, out_dim)."""
        return self.head(self.features(x))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: linear, transposed convs back to the exact input size, sigmoid.

    ``output_padding`` per level undoes the round-up of odd sides, so every (H, W) comes back
    exactly, without padding or resizing.

    Args:
        dim: latent dimension.
        image_shape: (H, W, C) of the images to produce.
        width: channels at full resolution; doubles per level.
    """

    def __init__(self, dim: int, image_shape: tuple[int, int, int], width: int):
        super().__init__()
        h, w, c = image_shape
        sizes = level_sizes(h, w)
        chans = level_channels(width, len(sizes) - 1)
        self.start = (chans[-1], *sizes[-1])
        self.fc = nn.Linear(dim, math.prod(self.start))
        layers: list[nn.Module] = [*norm_relu(chans[-1])]
        for i in range(len(sizes) - 1, 0, -1):
            (hi, wi), (ho, wo) = sizes[i], sizes[i - 1]
            pad = (ho - (2 * hi - 1), wo - (2 * wi - 1))  # 0 for odd targets, 1 for even
            layers += [
                nn.ConvTranspose2d(chans[i], chans[i - 1], 3, stride=2, padding=1,
                                   output_padding=pad),
                *norm_relu(chans[i - 1]),
            ]
        layers += [nn.Conv2d(chans[0], c, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N, C, H, W) in [0, 1]."""
        return self.net(self.fc(z).view(len(z), *self.start))

    @torch.no_grad()
    def start_at_mean(self, channel_mean: torch.Tensor) -> None:
        """Set the output bias so that the untrained decoder draws the data's mean intensity.

        A sigmoid at 0.5 over images that are mostly black pushed every early update towards
        "darker", the very push that saturated it; starting at the mean leaves only the
        differences between images to learn.

        Args:
            channel_mean: (C,) mean pixel value of each channel, in [0, 1].
        """
        last = self.net[-2]
        p = channel_mean.to(last.bias).clamp(1e-3, 1 - 1e-3)
        last.bias.copy_(torch.log(p / (1 - p)))


def mse_per_image(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error over pixels and channels: (N, C, H, W) x2 -> (N,)."""
    return (recon - x).pow(2).flatten(1).mean(1)


def bernoulli_excess(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy minus its floor (the entropy of x), summed per image: (N,).

    Same gradients as the BCE; 0 means a perfect reconstruction, so grey-level (non-binary)
    data do not leave a large constant in the loss curve.
    """
    bce = F.binary_cross_entropy(recon, x, reduction="none")
    floor = F.binary_cross_entropy(x, x, reduction="none")
    return (bce - floor).flatten(1).sum(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in closed form: (N, D) x2 -> (N,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


class AutoDecoder(nn.Module):
    """Per-image learnable codes and a shared decoder; no encoder (DeepSDF).

    Loss: MSE + ``prior_weight`` * mean squared code norm (a zero-mean Gaussian prior).

    Args:
        image_shape: (H, W, C).
        dim: code dimension.
        width: decoder width.
        n_train: number of training images, one code each.
        code_init_std: std of the Gaussian code initialisation.
        prior_weight: weight of the squared-norm prior.
    """

    components = ("recon", "prior")

    def __init__(self, image_shape: tuple[int, int, int], dim: int, width: int, n_train: int,
                 code_init_std: float = 0.01, prior_weight: float = 1e-4):
        super().__init__()
        self.prior_weight = prior_weight
        self.codes = nn.Embedding(n_train, dim)
        nn.init.normal_(self.codes.weight, 0.0, code_init_std)
        self.decoder = Decoder(dim, image_shape, width)

    def code_loss(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image reconstruction error and prior term of codes ``z`` (N, D): both (N,)."""
        return mse_per_image(self.decoder(z), x), self.prior_weight * z.pow(2).sum(1)

    def loss(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Batch loss of images ``x`` (N, C, H, W) whose codes sit at rows ``index`` (N,)."""
        recon, prior = self.code_loss(self.codes(index), x)
        recon, prior = recon.mean(), prior.mean()
        return recon + prior, {"recon": recon, "prior": prior}

    def reconstruct(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codes(index))

    def infer(self, x: torch.Tensor, steps: int, lr: float,
              start: torch.Tensor | None = None) -> torch.Tensor:
        """Codes for unseen images: optimise codes, decoder frozen (MAP under the prior).

        Each image's loss is summed, not averaged, so a code's update does not depend on
        which other images share the batch.

        Args:
            x: (N, C, H, W) in [0, 1].
            start: (N, D) initial codes (e.g. :class:`RidgeStart`); default zero, the prior
                mean.

        Returns:
            (N, D) codes.
        """
        if start is None:
            start = torch.zeros(len(x), self.codes.embedding_dim, device=x.device)
        z = start.detach().clone().to(x.device).requires_grad_(True)
        frozen = [p.requires_grad for p in self.decoder.parameters()]
        self.decoder.requires_grad_(False)
        opt = torch.optim.Adam([z], lr=lr)
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    recon, prior = self.code_loss(z, x)
                    opt.zero_grad(set_to_none=True)
                    (recon + prior).sum().backward()
                    opt.step()
        finally:
            for p, flag in zip(self.decoder.parameters(), frozen, strict=True):
                p.requires_grad_(flag)
        return z.detach()


class RidgeStart:
    """A linear map from pixels to the auto-decoder's learned codes, fitted in closed form.

    It gives inference a start near the answer: from zero, Adam needed 100 steps to reach the
    test reconstruction error that 20 steps reach from here (digits, bench/bench_latent.py).
    Ridge regression (centred, penalty ``alpha`` x the number of images) on the training
    images and their codes; images larger than ``MAX_FEATURES`` values are average-pooled
    down first, so the fit stays a small (F, F) solve whatever the image size. It reads
    pixels only, never labels.

    Args:
        images: uint8 (N, H, W, C) training images, rows matching ``codes``.
        codes: (N, D) their learned codes.
    """

    MAX_FEATURES = 3072

    def __init__(self, images: torch.Tensor, codes: torch.Tensor, alpha: float = 0.01,
                 batch: int = 4096):
        n, dim = len(images), codes.shape[1]
        xtx = xty = sx = None
        for s in range(0, n, batch):
            f = self.features(to_float(images[s:s + batch]))
            y = codes[s:s + batch].to(f)
            if xtx is None:
                xtx, xty = f.new_zeros(f.shape[1], f.shape[1]), f.new_zeros(f.shape[1], dim)
                sx, sy = f.new_zeros(f.shape[1]), f.new_zeros(dim)
            xtx += f.T @ f
            xty += f.T @ y
            sx += f.sum(0)
            sy += y.sum(0)
        self.mean_x, self.mean_y = sx / n, sy / n
        xtx -= n * torch.outer(self.mean_x, self.mean_x)
        xty -= n * torch.outer(self.mean_x, self.mean_y)
        ridge = alpha * n * torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
        self.weight = torch.linalg.solve(xtx + ridge, xty)

    @classmethod
    def features(cls, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, F) float64, pooled to at most ``MAX_FEATURES``."""
        _, c, h, w = x.shape
        if c * h * w > cls.MAX_FEATURES:
            side = max(1, math.isqrt(cls.MAX_FEATURES // c))
            x = F.adaptive_avg_pool2d(x, (min(h, side), min(w, side)))
        return x.flatten(1).double()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Start codes (N, D) float32 for images ``x`` (N, C, H, W) in [0, 1]."""
        return ((self.features(x) - self.mean_x) @ self.weight + self.mean_y).float()


class AutoEncoder(nn.Module):
    """Conv encoder and decoder trained on MSE; the representation is the encoder output."""

    components = ("recon",)

    def __init__(self, image_shape: tuple[int, int, int], dim: int, width: int):
        super().__init__()
        self.encoder = Encoder(image_shape, width, dim)
        self.decoder = Decoder(dim, image_shape, width)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D)."""
        return self.encoder(x)

    def loss(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        recon = mse_per_image(self.decoder(self.encoder(x)), x).mean()
        return recon, {"recon": recon}

    def reconstruct(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VAE(nn.Module):
    """Gaussian-posterior VAE; the representation is the posterior mean.

    Loss per image: binary cross-entropy summed over pixels (the Bernoulli decoder of Kingma &
    Welling, a proper likelihood on the KL's scale for [0, 1] data) + ``beta`` * KL(q(z|x) ||
    N(0, I)). A summed squared error (Gaussian, variance 1/2) is too weak a likelihood here:
    on digits the KL fell to 0.2 nats, an almost collapsed posterior.
    """

    components = ("recon", "kl")

    def __init__(self, image_shape: tuple[int, int, int], dim: int, width: int,
                 beta: float = 1.0):
        super().__init__()
        self.beta = beta
        self.encoder = Encoder(image_shape, width, 2 * dim)
        self.decoder = Decoder(dim, image_shape, width)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> mean (N, D) and log-variance (N, D), the latter clamped for exp."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 12.0)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def loss(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = bernoulli_excess(self.decoder(z), x).mean()
        kl = kl_divergence(mu, logvar).mean()
        return recon + self.beta * kl, {"recon": recon, "kl": kl}

    def reconstruct(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.posterior(x)[0])


# name -> (class, the LatentParams fields its constructor takes besides shape, dim, width)
LATENT_MODELS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "autodecoder": (AutoDecoder, ("code_init_std", "prior_weight")),
    "ae": (AutoEncoder, ()),
    "vae": (VAE, ("beta",)),
}


def check_model(name: str) -> None:
    if name not in LATENT_MODELS:
        raise PipelineError(
            f"unknown latent model {name!r}; known: {', '.join(LATENT_MODELS)}"
        )


def build_model(name: str, image_shape: tuple[int, int, int], dim: int, width: int,
                n_train: int, hyper: dict | None = None) -> nn.Module:
    """Instantiate registry entry ``name``.

    ``hyper`` maps param names to values and may hold more keys than the model takes: each
    model picks its own (listed in ``LATENT_MODELS``); missing ones take the class default.
    """
    check_model(name)
    cls, keys = LATENT_MODELS[name]
    kwargs = {k: hyper[k] for k in keys if hyper and k in hyper}
    if cls is AutoDecoder:
        kwargs["n_train"] = n_train
    return cls(tuple(image_shape), dim, width, **kwargs)
