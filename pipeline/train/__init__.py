"""Self-supervised training: one loop shared by every method, with neighbour sources and uses.

The public face, imported lazily so that the workflow can read the grid without torch:

* :func:`train` (``loop``): train one run of the grid and write its encoder.
* :class:`TrainParams` (``params``): the typed params of one run.
* :class:`Run`, :func:`runs`, :func:`train_params` (``grid``): the runs an experiment
  trains, their names and their params.
* :func:`write_untrained`, :func:`load_encoder`, :func:`encode_checkpoint` (``encoder``).

The parts: ``methods/`` (one file per method plus the registry), ``uses`` (how a step uses
neighbours), ``sources`` (where neighbours come from), ``optim`` (optimisers, schedules),
``data`` (what a run reads), ``checkpoint`` (resume and outputs), ``distributed`` (training
over several processes: ``train.processes``, ``train.nodes``).
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "train": "loop", "TrainParams": "params", "Run": "grid", "runs": "grid",
    "train_params": "grid", "write_untrained": "encoder", "load_encoder": "encoder",
    "encode_checkpoint": "encoder",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"pipeline.train.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'pipeline.train' has no attribute {name!r}")
