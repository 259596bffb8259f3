"""nnbyol: BYOL with nearest-neighbour positives mined in a learned latent space."""

__version__ = "0.1.0"


class PipelineError(ValueError):
    """Bad input a user can fix: printed as one line by the CLI, never as a traceback."""
