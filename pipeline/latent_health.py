"""Old import path of :mod:`pipeline.latent.health`, kept for the tests and bench that use it.

The very same module object, so attributes read or patched here are the package's.
"""

import sys

from pipeline.latent import health

sys.modules[__name__] = health
