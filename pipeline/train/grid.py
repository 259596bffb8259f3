"""The training grid: which runs an experiment trains, their names, and each run's params.

Torch-free, so that the workflow reads it at parse time. A run is one method with one
neighbour use and one neighbour source; its name reads as what it is:
``byol-baseline``, ``simclr-probabilistic-ae-cosine``, ``byol-weighted-vae-cosine-r2``
(refresh round 2), ``byol-topk-queue``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import PipelineError
from pipeline.schema import flatten

# The neighbour uses each method can take; ``pipeline.train.methods.METHODS`` names the same
# (a test checks). byol mixes targets, so it takes every use; simclr has no target to mix,
# but a neighbour's view can be its positive; nnclr's neighbours come from its own queue.
METHOD_USES: dict[str, tuple[str, ...]] = {
    "byol": ("baseline", "probabilistic", "weighted", "topk"),
    "simclr": ("baseline", "probabilistic"),
    "nnclr": ("baseline",),
}
# Where a neighbour use finds neighbours. ``latent`` and ``refresh`` read a table file that
# the DAG builds; ``queue`` searches the projections of earlier steps.
SOURCES = ("latent", "refresh", "queue")
# Keys that choose which runs exist and how their jobs are cut, never what one computes.
GRID_KEYS = ("methods", "uses", "seeds", "sources", "refresh_rounds", "seeds_in_one_job")
RUNTIME_KEYS = ("checkpoint_every", "device_memory_share", "knn_monitor", "tensorboard")
NEIGHBOUR_KEYS = ("filter", "neighbour_warmup_epochs", "queue")
VIEWS = ("view1", "view2")


@dataclass(frozen=True)
class Run:
    """One configuration of the grid (seeds apart)."""

    method: str
    use: str = "baseline"
    source: str = ""  # "" for a baseline, else a key of SOURCES
    space: str = ""  # the latent model whose space (latent, refresh) was mined
    metric: str = ""
    round: int = 1

    @property
    def name(self) -> str:
        parts = [self.method, self.use]
        if self.source == "queue":
            parts.append("queue")
        elif self.source:
            parts += [self.space, self.metric] + ([f"r{self.round}"] if self.round > 1 else [])
        return "-".join(parts)

    @property
    def baseline(self) -> str:
        return f"{self.method}-baseline"

    def columns(self) -> dict[str, Any]:
        """The results table's columns for this run (``variant`` is the neighbour use)."""
        return {"method": self.method, "variant": self.use, "source": self.source,
                "latent": self.space, "metric": self.metric,
                "round": self.round if self.source in ("latent", "refresh") else None}

    def previous(self) -> Run:
        """The run whose encoder a refresh round mines: the same run one round earlier."""
        return Run(self.method, self.use, "latent" if self.round == 2 else "refresh",
                   self.space, self.metric, self.round - 1)


def runs(config: dict) -> list[Run]:
    """Every run of the grid: each method's baseline, then each neighbour use it takes, per
    source (per latent space and metric and refresh round, and the queue)."""
    t = config["train"]
    spaces = [(m, d) for m in config["latent"]["models"] for d in config["neighbours"]["metrics"]]
    out = []
    for method in t["methods"]:
        for use in t["uses"]:
            if use not in METHOD_USES[method]:
                continue
            if use == "baseline":
                out.append(Run(method))
                continue
            if "latent" in t["sources"]:
                out += [Run(method, use, "latent" if r == 1 else "refresh", m, d, r)
                        for m, d in spaces for r in range(1, t["refresh_rounds"] + 1)]
            if "queue" in t["sources"]:
                out.append(Run(method, use, "queue"))
    return out


def check_grid(config: dict) -> None:
    """Combinations that mean nothing, refused in one line naming the keys."""
    t = config["train"]
    for use in t["uses"]:
        if not any(use in METHOD_USES[m] for m in t["methods"]):
            takers = [m for m, uses in METHOD_USES.items() if use in uses]
            takes = "; ".join(f"{m} takes {list(METHOD_USES[m])}" for m in t["methods"])
            raise PipelineError(
                f"config key 'train.uses': {use!r} means nothing for train.methods "
                f"{t['methods']} ({takes}); add {' or '.join(takers)} to train.methods or "
                f"drop {use!r}")
    wanted = [u for u in t["uses"] if u != "baseline"
              and any(u in METHOD_USES[m] for m in t["methods"])]
    for key, values in (("latent.models", config["latent"]["models"]),
                        ("neighbours.metrics", config["neighbours"]["metrics"])):
        if wanted and "latent" in t["sources"] and not values:
            raise PipelineError(
                f"config key {key!r}: [] is empty, but train.uses asks for {wanted}, which "
                "need neighbours; list at least one, set train.sources: [queue], or set "
                "train.uses: [baseline]")
    check_world(t["batch_size"], t["processes"], t["nodes"])
    k, mined = t["topk"]["k"], config["neighbours"]["k"]
    if "topk" in wanted and "latent" in t["sources"] and k - 1 > mined:
        raise PipelineError(f"config key 'train.topk.k': {k} needs {k - 1} neighbours per "
                            f"image, but neighbours.k is {mined}; raise neighbours.k or lower it")
    if wanted and "queue" in t["sources"]:
        from pipeline.train.sources import QueueParams, check_queue

        if t["filter"]["mutual"]:
            raise PipelineError("config key 'train.filter.mutual': queue neighbours change "
                                "every step, so they have no mutual table; set it to false "
                                "or drop queue from train.sources")
        check_queue(QueueParams(**t["queue"]), t["batch_size"], None,
                    k if "topk" in wanted else None)
    if "nnclr" in t["methods"]:
        check_support_queue(config["nnclr"]["queue_size"], t["batch_size"])
        if config["nnclr"]["k"] > config["nnclr"]["queue_size"]:
            raise PipelineError(f"config key 'nnclr.k': {config['nnclr']['k']} is larger than "
                                f"nnclr.queue_size ({config['nnclr']['queue_size']})")


def check_world(batch: int, processes: int, nodes: int) -> None:
    """The global batch must split into equal shards, one per process."""
    world = processes * nodes
    if batch % world:
        raise PipelineError(
            f"config key 'train.batch_size': batches of {batch} images do not split into "
            f"{world} equal shards (train.processes {processes} x train.nodes {nodes}); every "
            "process trains on batch_size / (processes x nodes) rows of each batch: choose a "
            f"multiple of {world}")


def check_support_queue(queue_size: int, batch: int) -> None:
    """NNCLR's support queue must hold at least one whole batch (before any job)."""
    if queue_size < batch:
        raise PipelineError(f"config key 'nnclr.queue_size': {queue_size} is smaller than the "
                            f"batch ({batch}); the queue must hold at least one batch of "
                            "earlier projections")


def train_params(config: dict, run: Run) -> dict[str, Any]:
    """The flat params of one run: the shared training keys, each view's augmentation in
    full, the run's own use section (``probabilistic.p_neighbour``) and its method's section
    (``byol.tau_base``). Keys a run never reads stay out, so changing them re-runs nothing
    of it: other uses' and methods' sections, the neighbour keys for a baseline, the queue
    for other sources."""
    t = config["train"]
    skip = set(GRID_KEYS) | set(RUNTIME_KEYS) | set(VIEWS) | {"augment"}
    skip |= {u for u in METHOD_USES["byol"] if u != "baseline"}
    if run.use == "baseline":
        skip |= set(NEIGHBOUR_KEYS)
    elif run.source != "queue":
        skip.add("queue")
    if run.method != "nnclr" and run.source != "queue":
        skip.add("queue_scope")  # only queues have a scope
    shared = {k: v for k, v in t.items() if k not in skip}
    views = {v: {**t.get("augment", {}), **t.get(v, {})} for v in VIEWS}
    own = {run.use: t[run.use]} if run.use != "baseline" else {}
    return flatten({**shared, **views, **own, run.method: config[run.method]})
