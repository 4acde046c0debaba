"""Concept overlays for Deep Feature Factorization (:func:`gradcam_jax.dff.deep_feature_factorization`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._grid import new_figure
from ._images import as_uint8_image, resize_map

__all__ = ["concept_image", "concept_overlay"]


def concept_colors(n: int, cmap: str = "gist_rainbow") -> np.ndarray:
    """``n`` distinct RGB colours in [0, 1], evenly spaced along ``cmap``: ``(n, 3)``."""
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    return np.array([colormap(i / n)[:3] for i in range(n)], np.float32)


def concept_image(image, maps, alpha: float = 0.6, colors=None) -> np.ndarray:
    """Colour each pixel by its strongest concept, brighter where that concept's map is stronger.

    Args:
      image: ``(H, W, 3)`` (uint8, or float in [0, 1]).
      maps: ``(n, h, w)`` concept maps in [0, 1] (one image's ``DeepFeatures.maps``; resized to
        the image).
      alpha: the weight of the colours (``1 - alpha`` for the image).
      colors: ``(n, 3)`` RGB in [0, 1] (default: :func:`concept_colors`).

    Returns:
      ``uint8`` ``(H, W, 3)``.

    Examples:
      >>> import numpy as np
      >>> from gradcam_jax.viz import concept_image
      >>> maps = np.stack([np.eye(4), 1 - np.eye(4)])
      >>> concept_image(np.zeros((8, 8, 3)), maps).shape
      (8, 8, 3)
    """
    img = as_uint8_image(image).astype(np.float32) / 255.0
    m = np.nan_to_num(np.asarray(maps, np.float32))
    if m.ndim != 3:
        raise ValueError(f"concept_image: maps must be (n, h, w), one image's concept maps; got {m.shape}.")
    m = np.clip(resize_map(m, img.shape[:2]), 0.0, 1.0)
    colors = concept_colors(len(m)) if colors is None else np.asarray(colors, np.float32)
    winner = np.argmax(m, axis=0)
    strength = np.max(m, axis=0)[..., None]
    painted = colors[winner] * strength
    out = (1.0 - alpha) * img + alpha * painted
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def concept_overlay(
    image,
    maps,
    labels: Sequence[str] | None = None,
    *,
    alpha: float = 0.6,
    title: str | None = None,
    width: float = 6.0,
    dpi: float = 100,
):
    """A figure: the image with its concepts coloured (:func:`concept_image`) and a legend.

    Args:
      image: ``(H, W, 3)``.
      maps: ``(n, h, w)`` one image's concept maps.
      labels: one legend line per concept (e.g. its top classes and their probabilities); by
        default ``"concept i"``.
      alpha, title: the colours' weight; a title above the image.
      width, dpi: the figure's width in inches and its resolution.

    Returns:
      A Matplotlib ``Figure`` (save it with :func:`gradcam_jax.viz.save_png`).
    """
    from matplotlib.patches import Patch

    m = np.asarray(maps)
    n = m.shape[0] if m.ndim == 3 else 0
    labels = [f"concept {i}" for i in range(n)] if labels is None else [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"concept_overlay: {len(labels)} labels for {n} concept maps.")
    colors = concept_colors(max(n, 1))
    shown = concept_image(image, m, alpha, colors)
    h, w = shown.shape[:2]
    legend_h = 0.28 * n + 0.3
    img_h = width * h / w
    fig = new_figure(width, img_h + legend_h + (0.4 if title else 0.0), dpi)
    total = fig.get_figheight()
    ax = fig.add_axes((0.0, legend_h / total, 1.0, img_h / total))
    ax.imshow(shown)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    handles = [Patch(facecolor=tuple(colors[i]), label=labels[i]) for i in range(n)]
    fig.legend(handles=handles, loc="lower left", fontsize=9, frameon=False, ncol=1)
    return fig
