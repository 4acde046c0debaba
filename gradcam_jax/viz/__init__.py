"""Pictures of explanations: heatmap overlays, gradient images, and figure grids.

Everything here runs on the host with NumPy, Pillow and Matplotlib; figures are drawn on
Matplotlib's Agg canvas (no display, no ``pyplot`` state), so it works headless, in threads
and in notebooks alike.

* :func:`overlay` — a heatmap in [0, 1] coloured with a Matplotlib colormap and blended over
  the image (any heatmap size: it is resized to the image).
* :func:`gradient_image` — an input-gradient map (Guided Backprop, Guided Grad-CAM) as a
  viewable RGB image.
* :func:`figure_grid` — one row per explained class, one column per method: the image, then
  e.g. Grad-CAM | Guided Backprop | Guided Grad-CAM, rows labelled with the class name and its
  probability.
* :func:`signal_figure` — a 1-D signal ``(T, C)`` (time series, audio features) drawn as lines,
  with one heat strip per map ``(T,)`` underneath (or the map as a coloured band behind it).
* :func:`volume_figure` — a volume or a video ``(D, H, W[, C])`` as a grid of slices / frames
  along one axis, each overlaid with its slice of the ``(D, H, W)`` heatmap.
* :func:`save_png` / :func:`png_bytes` — write a figure or an image.
* :func:`concept_overlay` / :func:`concept_image` — Deep Feature Factorization's concepts, each
  pixel coloured by its strongest concept, with a legend.

All functions accept a single example or a batch (leading batch axis). :func:`overlay` and
:func:`figure_grid` draw images only; given a signal or a volume they say which function to use.
"""

from ._concepts import concept_image as concept_image
from ._concepts import concept_overlay as concept_overlay
from ._grid import figure_grid as figure_grid
from ._images import METHOD_TITLES as METHOD_TITLES
from ._images import gradient_image as gradient_image
from ._images import overlay as overlay
from ._images import png_bytes as png_bytes
from ._images import resize_map as resize_map
from ._images import save_png as save_png
from ._signal import signal_figure as signal_figure
from ._volume import volume_figure as volume_figure

__all__ = [
    "overlay",
    "gradient_image",
    "figure_grid",
    "signal_figure",
    "volume_figure",
    "save_png",
    "png_bytes",
    "resize_map",
    "METHOD_TITLES",
    "concept_overlay",
    "concept_image",
]
