"""Typed params of one training run: the shared keys (``train:``), the run's neighbour use
and its method's own section; built from the flat params by :func:`pipeline.schema.build`,
every value checked by the schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.augment import AugmentParams
from pipeline.train.sources import FilterParams, QueueParams


@dataclass
class ProbabilisticParams:
    p_neighbour: float = 0.5


@dataclass
class WeightedParams:
    pos_weight: float = 0.5


@dataclass
class TopkParams:
    k: int = 5


@dataclass
class ByolParams:
    tau_base: float = 0.99


@dataclass
class SimclrParams:
    temperature: float = 0.2


@dataclass
class NnclrParams:
    temperature: float = 0.2
    queue_size: int = 4096
    k: int = 1


@dataclass
class TrainParams:
    backbone: str = "auto"
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 0.002
    weight_decay: float = 1e-4
    lars_eta: float = 0.02
    lars_exclude_bias_norm: bool = True
    wd_exclude_bias_norm: bool = True
    warmup_epochs: int = 2
    proj_dim: int = 64
    proj_hidden: int = 256
    checkpoint_every: int = 5
    compile: bool = False
    precision: str = "auto"
    device_memory_share: float = 0.5
    # Data-parallel training (pipeline.train.distributed).
    processes: int = 1
    nodes: int = 1
    queue_scope: str = "gathered"
    sync_batchnorm: bool = False
    knn_monitor: int = 1000
    tensorboard: bool = False
    # BYOL's asymmetric views (Grill et al. 2020): blur always on view 1; rarely blur,
    # sometimes solarise view 2. Every method trains on the same views.
    view1: AugmentParams = field(
        default_factory=lambda: AugmentParams(blur_prob=1.0, solarize_prob=0.0))
    view2: AugmentParams = field(
        default_factory=lambda: AugmentParams(blur_prob=0.1, solarize_prob=0.2))
    # The neighbour uses' own keys (a run's params hold only its own use's section).
    probabilistic: ProbabilisticParams = field(default_factory=ProbabilisticParams)
    weighted: WeightedParams = field(default_factory=WeightedParams)
    topk: TopkParams = field(default_factory=TopkParams)
    # Neighbour runs only: the queue source, label-free filters, and a warm-up that ramps
    # the neighbours' share (p, w or the top-k share) linearly from 0.
    queue: QueueParams = field(default_factory=QueueParams)
    filter: FilterParams = field(default_factory=FilterParams)
    neighbour_warmup_epochs: int = 0
    # Each method's own keys (a run's params hold only its own method's section).
    byol: ByolParams = field(default_factory=ByolParams)
    simclr: SimclrParams = field(default_factory=SimclrParams)
    nnclr: NnclrParams = field(default_factory=NnclrParams)
