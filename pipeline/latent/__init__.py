"""Latent stage: train an auto-decoder, auto-encoder or VAE on the images; export latents.

The public face: :func:`train_latent` (``loop``) trains one model and writes its checkpoint;
:func:`export_latents` (``export``) writes every image's latent. The parts: ``params``
(``LatentParams``), ``models`` (the three models and their registry), ``collapse`` (the
torch-free collapse thresholds), ``health`` (collapse checks against the mean image),
``loop`` (training), ``export`` (encoding, the parquet).
"""

from __future__ import annotations

import importlib

# Imported lazily, so that a module importing one part (the neighbours stage reads
# ``collapse.SPREAD_MIN``) does not depend on the whole stage: rules derive their code inputs
# from these imports.
_PUBLIC = {
    "encode": "export", "export_latents": "export", "load_checkpoint": "export",
    "CollapseCheck": "collapse", "RECON_SHOWN": "loop", "train_latent": "loop",
    "ENCODE_BATCH": "models", "LATENT_MODELS": "models", "build_model": "models",
    "check_model": "models", "LatentParams": "params", "check_params": "params",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"pipeline.latent.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'pipeline.latent' has no attribute {name!r}")
