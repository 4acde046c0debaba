"""3-D explanations: a volume or video as a grid of slices / frames with the heatmap overlaid on each
(see :mod:`gradcam_jax.viz`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._grid import new_figure
from ._images import as_uint8_image, overlay, resize_linear

__all__ = ["volume_figure", "volume_rgb", "fit_heatmap", "pick_slices"]

_FONT = 8.0


def volume_figure(
    volume,
    heatmap,
    *,
    axis: int = 0,
    slices: Sequence[int] | None = None,
    max_slices: int = 8,
    alpha: float = 0.5,
    cmap="jet",
    title=None,
    ncols: int | None = None,
    slice_label: str = "slice",
    panel_width: float = 1.8,
    dpi: float = 100,
):
    """A volume (or a video) and its heatmap as a grid of slices, each overlaid with the heatmap.

    Args:
      volume: ``(D, H, W)`` (grey) or ``(D, H, W, C)`` with ``C`` in 1, 3 (4: alpha dropped);
        ``uint8``, or numbers of any range (scaled to [0, 1] over the whole volume when outside
        it, e.g. CT intensities). A video ``(T, H, W, 3)`` is a volume with ``axis=0``. A batch
        ``(B, D, H, W[, C])`` with a ``(B, d, h, w)`` heatmap gives one figure per example.
      heatmap: ``(d, h, w)`` values in [0, 1] (clipped), as the explainers return them; resized
        trilinearly to ``(D, H, W)`` when smaller (one target: index ``K`` maps first).
      axis: the axis sliced, 0 (depth / time), 1 (height) or 2 (width); negative counts back.
      slices: the indices along ``axis`` to show, in order; ``None`` picks ``max_slices`` evenly
        spaced ones (all of them when there are fewer).
      max_slices: how many slices ``slices=None`` picks.
      alpha, cmap: heatmap overlay settings (see :func:`overlay`).
      title: a line above the grid (a list of them, one per example, for a batch).
      ncols: panels per row (default: up to 4).
      slice_label: the panels' caption, followed by the index (``"frame"`` for videos).
      panel_width, dpi: one panel's width in inches and the figure's resolution.

    Returns:
      A ``matplotlib.figure.Figure`` on the Agg canvas with one axes per slice, in order (a list
      of figures for a batch). Save it with :func:`save_png`.

    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((10, 16, 12))  # (D, H, W)
    >>> fig = volume_figure(vol, np.ones((5, 4, 3)), max_slices=4)
    >>> [ax.get_title() for ax in fig.axes]
    ['slice 1', 'slice 3', 'slice 6', 'slice 8']
    """
    hm = np.asarray(heatmap, np.float32)
    options = dict(axis=axis, slices=slices, max_slices=max_slices, alpha=alpha, cmap=cmap, ncols=ncols)
    options.update(slice_label=slice_label, panel_width=panel_width, dpi=dpi)
    if hm.ndim == 4:
        return _volume_batch(volume, hm, title, **options)
    vol, hm, axis = _checked(volume, hm, axis)
    chosen = pick_slices(vol.shape[axis], slices, max_slices)
    panels = [overlay(np.take(vol, i, axis), np.take(hm, i, axis), alpha=alpha, cmap=cmap) for i in chosen]
    captions = [f"{slice_label} {i}".strip() for i in chosen]
    return _draw_slices(panels, captions, title, ncols=ncols, panel_width=panel_width, dpi=dpi)


def _checked(volume, hm: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The volume as ``uint8`` RGB, the heatmap at its size, and ``axis`` in 0..2 (or an error)."""
    if hm.ndim != 3:
        raise ValueError(
            f"volume_figure: the heatmap must be (d, h, w) (or a batch (B, d, h, w)); got shape {hm.shape}. "
            "For K targets pick one map (heatmap[k]); for images use viz.figure_grid, for signals "
            "viz.signal_figure."
        )
    if not -3 <= axis < 3:
        raise ValueError(f"volume_figure: axis must be 0, 1 or 2 (or -3..-1); got {axis}.")
    vol = volume_rgb(volume)
    return vol, fit_heatmap(hm, vol.shape[:3]), axis % 3


def _volume_batch(volume, hm: np.ndarray, title, **options) -> list:
    """:func:`volume_figure` of each example of a batch, with its heatmap and title."""
    vol = np.asarray(volume)
    b = hm.shape[0]
    if vol.ndim not in (4, 5) or vol.shape[0] != b:
        raise ValueError(
            f"volume_figure: a batch of {b} heatmaps {hm.shape} needs a batch of {b} volumes (B, D, H, W) or "
            f"(B, D, H, W, C); got shape {vol.shape}. For K target maps of one volume, pick one (heatmap[k])."
        )
    titles = title if isinstance(title, (list, tuple)) else [title] * b
    return [volume_figure(vol[i], hm[i], title=titles[i], **options) for i in range(b)]


def volume_rgb(volume) -> np.ndarray:
    """A volume ``(D, H, W)`` or ``(D, H, W, C)`` as ``uint8`` RGB ``(D, H, W, 3)``.

    ``uint8`` and ``bool`` volumes are shown as they are; other numbers are scaled to [0, 1] by the
    volume's minimum and maximum when they fall outside [0, 1] (a constant volume is black).

    Args:
      volume: ``(D, H, W)`` grey, or ``(D, H, W, C)`` with ``C`` in 1, 3, 4.

    Returns:
      ``uint8`` ``(D, H, W, 3)``.

    >>> volume_rgb(np.arange(8).reshape(2, 2, 2)).shape
    (2, 2, 2, 3)
    """
    v = np.asarray(volume)
    if not (v.ndim == 3 or (v.ndim == 4 and v.shape[-1] in (1, 3, 4))):
        raise ValueError(
            f"volume_figure: the volume must be (D, H, W) or (D, H, W, C) with C in 1, 3; got shape "
            f"{v.shape} (channels-first volumes: move the channels last). For images use viz.figure_grid."
        )
    if v.ndim == 3:
        v = v[..., None]
    if v.dtype not in (np.uint8, np.bool_):
        v = np.nan_to_num(v.astype(np.float32))
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:
            v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return as_uint8_image(v)


def fit_heatmap(hm: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A ``(d, h, w)`` heatmap resized trilinearly to the volume's ``(D, H, W)``, clipped to [0, 1]."""
    if any(n > size for n, size in zip(hm.shape, shape, strict=True)):
        raise ValueError(
            f"volume_figure: the heatmap {hm.shape} is larger than the volume {tuple(shape)} along some "
            "axis; give the heatmap of this volume (D, H, W first, channels last), at its size or smaller."
        )
    return np.clip(np.nan_to_num(resize_linear(hm, shape)), 0.0, 1.0)


def pick_slices(n: int, slices: Sequence[int] | None, max_slices: int) -> list[int]:
    """The slice indices to show along an axis of ``n``: ``slices`` checked (negatives count from
    the end), or the centres of ``max_slices`` equal parts of the axis.

    Args:
      n: the axis' length.
      slices: the chosen indices, or ``None``.
      max_slices: how many to pick when ``slices`` is ``None`` (at most ``n``).

    Returns:
      The indices, each in ``[0, n)``.

    >>> pick_slices(64, None, 4), pick_slices(3, None, 8), pick_slices(10, [0, -1], 8)
    ([8, 24, 40, 56], [0, 1, 2], [0, 9])
    """
    if slices is None:
        if max_slices < 1:
            raise ValueError(f"volume_figure: max_slices must be at least 1; got {max_slices}.")
        k = min(n, int(max_slices))
        return [int(i) for i in np.floor((np.arange(k) + 0.5) * n / k)]
    chosen = [int(i) for i in np.asarray(slices).reshape(-1)]
    bad = [i for i in chosen if not -n <= i < n]
    if not chosen or bad:
        raise ValueError(
            f"volume_figure: slices must be indices along an axis of {n}; got {list(slices)}"
            + (f" ({bad} out of range)." if bad else " (none).")
        )
    return [i % n for i in chosen]


def _draw_slices(panels: list[np.ndarray], captions: list[str], title, *, ncols, panel_width, dpi):
    """The panels in a grid, ``ncols`` a row, each captioned above; a title line on top."""
    n = len(panels)
    cols = max(1, min(n, int(ncols) if ncols else 4))
    rows = -(-n // cols)
    h, w = panels[0].shape[:2]
    pw = float(panel_width)
    ph = pw * h / w
    if ph > 1.6 * pw:  # very tall slices: cap the height, narrow the panel
        ph = 1.6 * pw
        pw = ph * w / h
    gap_x, gap_y, margin = 0.08, 0.28, 0.08
    top = 0.26 + (0.3 if title else 0.0)
    fig_w = 2 * margin + cols * pw + (cols - 1) * gap_x
    fig_h = top + rows * ph + (rows - 1) * gap_y + margin
    fig = new_figure(fig_w, fig_h, dpi)
    for i, (shown, caption) in enumerate(zip(panels, captions, strict=True)):
        r, c = divmod(i, cols)
        left, bottom = margin + c * (pw + gap_x), fig_h - top - (r + 1) * ph - r * gap_y
        ax = fig.add_axes((left / fig_w, bottom / fig_h, pw / fig_w, ph / fig_h))
        ax.set(xticks=[], yticks=[])
        ax.imshow(shown)
        ax.set_title(caption, fontsize=_FONT, pad=3)
    if title:
        fig.text(margin / fig_w, 1 - 0.1 / fig_h, str(title), ha="left", va="top", fontsize=_FONT + 1.5)
    return fig
