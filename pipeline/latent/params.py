"""The latent stage's params: the ``latent`` config section, checked against the schema."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.latent.models import check_model
from pipeline.schema import check_fields


@dataclass
class LatentParams:
    dim: int = 16
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.002
    width: int = 32
    seed: int = 0
    # autodecoder
    prior_weight: float = 1e-4
    code_lr: float = 0.01
    code_init_std: float = 0.01
    infer_steps: int = 20
    infer_lr: float = 0.01
    infer_start: str = "ridge"
    # vae
    beta: float = 1.0
    # runtime only (not cache keys): what a detected collapse does; the training images'
    # largest share of the device's memory before they are streamed (same result either way)
    on_collapse: str = "error"
    device_memory_share: float = 0.5


def check_params(p: LatentParams, model: str) -> None:
    """Raise PipelineError for an unknown model or a value outside the schema's range."""
    check_model(model)
    check_fields(p)
