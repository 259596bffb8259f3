"""The prepare stage's params (the ``dataset`` config section) and the root they point at."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import PipelineError


@dataclass
class SyntheticParams:
    classes: int = 4
    per_class: int = 40
    size: int = 16
    channels: int = 1
    noise: float = 0.2


@dataclass
class PrepareParams:
    name: str = "digits"
    tag: str | None = None
    root: str | None = None
    download: bool = False
    resize: int | None = None
    test_fraction: float = 0.2
    max_train: int | None = None
    max_test: int | None = None
    stl10_unlabeled: bool = False
    seed: int = 0
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


DOWNLOADABLE = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10")


def _require_root(p: PrepareParams) -> Path:
    if not p.root:
        raise PipelineError(f"dataset.root is required for dataset.name={p.name!r}")
    root = Path(p.root)
    # Only torchvision's sets can be downloaded; a missing image folder or npz stays missing.
    downloadable = p.name in DOWNLOADABLE
    if not root.exists() and not (p.download and downloadable):
        hint = " or set dataset.download: true" if downloadable else ""
        raise PipelineError(
            f"dataset.root {str(root)!r} does not exist (dataset.name={p.name!r}); "
            f"point it at the files{hint}"
        )
    return root
