"""How the training images reach the device, for every method and the latent models:
resident (the whole training set on the device, batches gathered by index) or streamed
(batches read from the memory-mapped prepared set, through pinned memory, with the next
batch's anchors read in the background).

Both feeds hand the loop the same uint8 (B, H, W, C) images for the same indices, so a run
draws the same images in the same order and gives the same result either way; the choice
is ``train.device_memory_share`` against the device's memory (:func:`choose_feed`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from pipeline.io import RowView

log = logging.getLogger("pipeline.train")


def device_memory(dev: torch.device) -> int:
    """Bytes the training images may use on ``dev``: free GPU memory on CUDA, available RAM
    (``MemAvailable``) on the CPU."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_feed(nbytes: int, share: float, dev: torch.device,
                key: str = "train.device_memory_share") -> tuple[bool, str]:
    """Whether images of ``nbytes`` stay on ``dev`` (at most ``share`` of its memory, the
    config ``key``), and the log line saying why."""
    limit = share * device_memory(dev)
    gb = f"{nbytes / 1e9:.2f} GB of training images"
    if nbytes <= limit:
        return True, f"{gb} kept on the device ({key} {share:g} allows {limit / 1e9:.2f} GB)"
    return False, (f"{gb} are more than {key} {share:g} of the device's "
                   f"memory ({limit / 1e9:.2f} GB): streaming batches from the prepared set")


class StreamedImages:
    """Training images read from disk batch by batch: ``images[idx]`` as a device tensor.

    ``prefetch(idx)`` starts reading the rows of the next batch in a background thread
    (into pinned memory on CUDA); indexing with the same indices then takes them. Other
    indices (neighbours drawn during the step) are read at once. The last batch read is
    kept, since a step takes both anchor views of the same indices.
    """

    def __init__(self, images: RowView | np.ndarray, dev: torch.device):
        self.images, self.dev = images, dev
        self.shape = tuple(images.shape)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: tuple[torch.Tensor, Future] | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.dev

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        order = np.argsort(idx, kind="stable")  # read in file order, return in batch order
        rows = np.empty((len(idx), *self.shape[1:]), np.uint8)
        rows[order] = self.images[idx[order]]
        x = torch.from_numpy(rows)
        return x.pin_memory() if self.dev.type == "cuda" else x

    def prefetch(self, idx: torch.Tensor) -> None:
        self._pending = (idx, self._pool.submit(self._read, idx.cpu().numpy()))

    def __getitem__(self, idx: torch.Tensor | int | slice) -> torch.Tensor:
        if isinstance(idx, (int, slice)):  # a row or a run of rows: statistics, probes
            return torch.from_numpy(np.ascontiguousarray(self.images[idx])).to(self.dev)
        if self._last is not None and self._last[0] is idx:
            return self._last[1]
        if self._pending is not None and torch.equal(self._pending[0], idx):
            host = self._pending[1].result()
            self._pending = None
        else:
            host = self._read(idx.cpu().numpy())
        out = host.to(self.dev, non_blocking=True)
        self._last = (idx, out)
        return out


def feed(images: RowView | np.ndarray, share: float, dev: torch.device,
         key: str = "train.device_memory_share", say: Callable[[str], None] = log.info
         ) -> torch.Tensor | StreamedImages:
    """The training images as the loop indexes them: a device tensor when they fit
    ``share`` (config ``key``) of the device's memory, else :class:`StreamedImages`;
    ``say`` logs why."""
    resident, why = choose_feed(images.nbytes, share, dev, key)
    say(why)
    if resident:
        return torch.from_numpy(images[:]).to(dev)
    return StreamedImages(images, dev)
