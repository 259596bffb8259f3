"""Thread counts: the scheduler's grant honoured by torch, BLAS and FAISS, without importing
torch (``prepare`` never needs it, and its import alone is about 0.6 GB of memory)."""

from __future__ import annotations

import os
import sys


def set_threads(threads: int | None) -> None:
    """Honour the scheduler's thread grant in torch, BLAS and FAISS."""
    if not threads or threads < 1:
        return
    # torch, BLAS and FAISS read OMP_NUM_THREADS when first imported; importing FAISS here
    # would also defeat the neighbours stage's OpenBLAS kernel choice, which must come first.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # already imported: tell it directly
        sys.modules["torch"].set_num_threads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
