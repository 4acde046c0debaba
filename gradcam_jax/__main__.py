"""``python -m gradcam_jax``: the ``gradcam-jax`` command (see :mod:`gradcam_jax.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
