"""Rebuild ``demo.jpg`` from the two public-domain (CC0) photographs shipped by scikit-image.

    python gradcam_jax/assets/make_demo_image.py     # needs scikit-image and Pillow

The demo picture puts two ImageNet objects side by side, each filling its own half, so that a
class-discriminative method has to put each class's evidence on the right half:

* left:  ``skimage.data.chelsea()`` (a cat; CC0, photographer Stefan van der Walt), columns
         75-374 of the 300 x 451 original — a 300 x 300 crop, not resampled;
* right: ``skimage.data.coffee()`` (an espresso cup; CC0, photographer Rachel Michetti), rows
         0-299 and columns 130-429 of the 400 x 600 original — a 300 x 300 crop, not resampled;
* a 32-pixel white gutter between them, so that the network's centre column of 32 x 32-pixel
  cells (the final feature map is 7 x 7) does not straddle both photographs.

Saved as a baseline JPEG, quality 90, 4:2:0 chroma subsampling (300 x 632 pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CAT_COLUMNS = (75, 375)
COFFEE_ROWS = (0, 300)
COFFEE_COLUMNS = (130, 430)
GUTTER = 32


def build() -> np.ndarray:
    from skimage import data

    cat = data.chelsea()[:, CAT_COLUMNS[0] : CAT_COLUMNS[1]]
    coffee = data.coffee()[COFFEE_ROWS[0] : COFFEE_ROWS[1], COFFEE_COLUMNS[0] : COFFEE_COLUMNS[1]]
    gutter = np.full((cat.shape[0], GUTTER, 3), 255, np.uint8)
    return np.concatenate([cat, gutter, coffee], axis=1)


DEFAULT_OUT = Path(__file__).with_name("demo.jpg")


def main(out: Path = DEFAULT_OUT) -> None:
    from PIL import Image

    Image.fromarray(build()).save(out, "JPEG", quality=90, subsampling="4:2:0", optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
