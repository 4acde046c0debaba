"""``python -m gradcam_jax.dataset DIR --out STORE``: the ``explain-dir`` command."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
