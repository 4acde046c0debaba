"""``python -m gradcam_jax.dataset DIR --out STORE``: the ``explain-dir`` command
(see :mod:`gradcam_jax.cli.explain_dir`)."""

import sys

from ..cli.explain_dir import main

if __name__ == "__main__":
    sys.exit(main())
