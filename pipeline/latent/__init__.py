"""Latent stage: train an auto-decoder, auto-encoder or VAE on the images; export latents.

The public face: :func:`train_latent` (``loop``) trains one model and writes its checkpoint;
:func:`export_latents` (``export``) writes every image's latent. The parts: ``params``
(``LatentParams``), ``models`` (the three models and their registry), ``health`` (collapse
checks against the mean image), ``loop`` (training), ``export`` (encoding, the parquet).
"""

from __future__ import annotations

from pipeline.latent.export import encode, export_latents, load_checkpoint
from pipeline.latent.health import CollapseCheck
from pipeline.latent.loop import RECON_SHOWN, train_latent
from pipeline.latent.models import ENCODE_BATCH, LATENT_MODELS, build_model, check_model
from pipeline.latent.params import LatentParams, check_params

__all__ = [
    "ENCODE_BATCH", "LATENT_MODELS", "RECON_SHOWN", "CollapseCheck", "LatentParams",
    "build_model", "check_model", "check_params", "encode", "export_latents", "load_checkpoint",
    "train_latent",
]
