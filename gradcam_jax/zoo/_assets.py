"""The files shipped in ``gradcam_jax/assets``: class names and the demo picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ASSETS", "DEMO_IMAGE", "demo_image", "load_class_names"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"

#: The bundled two-object picture (CC0; see assets/README.md): an Egyptian cat (class 285)
#: on the left, an espresso (967) on the right.
DEMO_IMAGE = ASSETS / "demo.jpg"


def demo_image():
    """The bundled demo picture as a uint8 RGB array ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(DEMO_IMAGE) as im:
        return np.asarray(im.convert("RGB"))


def load_class_names(name: str = "imagenet_classes.txt") -> tuple[str, ...]:
    """Class names shipped in ``gradcam_jax/assets`` (one per line, in class-index order)."""
    text = (ASSETS / name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
