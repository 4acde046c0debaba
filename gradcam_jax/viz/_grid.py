"""Figure grids: one row per explained class, one column per method (see :mod:`gradcam_jax.viz`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._images import METHOD_TITLES, NOT_AN_IMAGE, as_uint8_image, gradient_image, overlay, resize_rgb

__all__ = ["figure_grid", "new_figure"]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float, dpi: float):
    """An empty white ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _looks_rgb(a: np.ndarray) -> bool:
    """A per-image array ``(h, w, C)`` (an input gradient) rather than ``(K, h, w)`` heatmaps."""
    return a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] > 4


def _rows_in(a: np.ndarray) -> int | None:
    """How many class rows one image's array holds, or None when it is one shared map."""
    if a.ndim == 4 or (a.ndim == 3 and not _looks_rgb(a)):
        return a.shape[0]
    return None


def _split_classes(name: str, arr, k: int) -> np.ndarray:
    """Bring one method's maps for one image to ``(K, h, w)`` or ``(K, h, w, C)``."""
    a = np.asarray(arr)
    if a.ndim in (2, 3) and _rows_in(a) is None:  # one shared map: (h, w) or (h, w, C)
        return np.broadcast_to(a, (k,) + a.shape)
    if a.ndim in (3, 4) and a.shape[0] == k:  # (K, h, w) or (K, h, w, C)
        return a
    raise ValueError(
        f"figure_grid: maps[{name!r}] has shape {a.shape} for one image with {k} row(s); give "
        f"(K, h, w) heatmaps, (K, h, w, C) gradients, or one (h, w) / (h, w, C) map for all rows."
    )


_BASE_FONT = 9.5


def figure_grid(
    image,
    maps: Mapping[str, object],
    classes: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    probs=None,
    alpha: float = 0.5,
    cmap="jet",
    title: str | None = None,
    panel_width: float = 2.6,
    dpi: float = 150,
    show_image: bool = True,
):
    """A publication-style grid: one row per class, one column per method.

    Columns: the image (when ``show_image``), then one per entry of ``maps`` in order — heatmaps
    (Grad-CAM & co.) are overlaid on the image, input gradients (Guided Backprop, Guided
    Grad-CAM) are drawn with :func:`gradient_image`. Each row is labelled with the class name
    and its probability; columns are headed with the method's name.

    Args:
      image: ``(H, W, 3)`` for one figure, or ``(B, H, W, 3)`` for a list of figures; ``uint8``
        or floats in [0, 1]. Maps of another size (the model's input size) are resized to it.
      maps: method name -> maps for the rows. Per image: ``(K, h, w)`` heatmaps in [0, 1] or
        ``(K, h, w, C)`` gradients; with a batch, a leading ``B`` axis. A single ``(h, w)`` or
        ``(h, w, C)`` map (per image) is shown in every row. Names in :data:`METHOD_TITLES` are
        printed nicely; others as given.
      classes: the K class indices of the rows (per image with a batch: ``(B, K)``).
      class_names: names indexed by class (e.g. a zoo model's ``class_names``).
      probs: the model's probabilities, ``(num_classes,)`` per image (``(B, num_classes)`` for a
        batch), or directly ``(K,)`` / ``(B, K)`` for the rows.
      alpha, cmap: heatmap overlay settings (see :func:`overlay`).
      title: a line above the grid (the file name, the model...).
      panel_width: width of one panel in inches; the height follows the image's aspect.
      dpi: the figure's resolution.
      show_image: include the plain image as the first column.

    Returns:
      A ``matplotlib.figure.Figure`` (a list of them for a batch). Save with :func:`save_png`.
    """
    # long-function: the docstring documents every option; the body is short.
    _check_image_rank(image, maps)
    img = as_uint8_image(image)
    if img.ndim == 4:
        return _figure_grid_batch(
            img,
            maps,
            classes,
            probs,
            title,
            class_names=class_names,
            alpha=alpha,
            cmap=cmap,
            panel_width=panel_width,
            dpi=dpi,
            show_image=show_image,
        )
    if img.ndim != 3:
        raise ValueError(
            f"figure_grid: image must be (H, W, 3) or (B, H, W, 3); got {np.shape(image)}. {NOT_AN_IMAGE}"
        )
    if not maps and not show_image:
        raise ValueError("figure_grid: nothing to draw (no maps and show_image=False).")

    rows = _grid_rows(maps, classes)
    panels = {name: _split_classes(name, v, len(rows)) for name, v in maps.items()}
    row_probs = _grid_row_probs(probs, rows, by_class=classes is not None)
    labels = [
        _row_label(cls, class_names, None if row_probs is None else row_probs[r])
        for r, cls in enumerate(rows)
    ]
    labelled = any(r is not None for r in rows) or bool(row_probs)
    fig_w, fig_h, left, rects = _grid_layout(
        img.shape[:2],
        len(panels) + int(show_image),
        len(rows),
        panel_width,
        labelled=labelled,
        titled=bool(title),
    )
    fig = new_figure(fig_w, fig_h, dpi)
    _draw_grid(fig, rects, img, panels, labels, show_image=show_image, alpha=alpha, cmap=cmap)
    if title:
        fig.text(
            left / fig_w, 1 - 0.16 / fig_h, title, ha="left", va="top", fontsize=_BASE_FONT, color="0.25"
        )
    return fig


def _check_image_rank(image, maps: Mapping[str, object]) -> None:
    """Refuse a signal or a volume (a 1-D or 5-D image, a 1-D map) rather than draw nonsense."""
    shapes = {name: np.asarray(v).shape for name, v in maps.items()}
    flat = [name for name, shape in shapes.items() if len(shape) == 1]
    if np.ndim(image) in (1, 5) or flat:
        what = f"maps[{flat[0]!r}] of shape {shapes[flat[0]]}" if flat else f"shape {np.shape(image)}"
        raise ValueError(f"figure_grid draws images (H, W, 3) and their 2-D maps; got {what}. {NOT_AN_IMAGE}")


def _figure_grid_batch(img: np.ndarray, maps: Mapping[str, object], classes, probs, title, **options) -> list:
    """:func:`figure_grid` of each image of a batch ``(B, H, W, 3)``, with its maps, classes, probs."""
    b = img.shape[0]
    cls_b = None if classes is None else np.asarray(classes).reshape(b, -1)
    p_b = None if probs is None else np.asarray(probs).reshape(b, -1)
    titles = title if isinstance(title, (list, tuple)) else [title] * b
    return [
        figure_grid(
            img[i],
            {k: np.asarray(v)[i] for k, v in maps.items()},
            None if cls_b is None else cls_b[i],
            probs=None if p_b is None else p_b[i],
            title=titles[i],
            **options,
        )
        for i in range(b)
    ]


def _grid_rows(maps: Mapping[str, object], classes) -> list[int | None]:
    """The rows' classes: ``classes``, or as many ``None`` as the maps have rows (at least one)."""
    if classes is not None:
        return [int(c) for c in np.asarray(classes).reshape(-1)]
    counts = [_rows_in(np.asarray(v)) for v in maps.values()]
    return [None] * next((n for n in counts if n is not None), 1)


def _grid_row_probs(probs, rows: list[int | None], *, by_class: bool) -> list[float] | None:
    """Each row's probability, from one per class of the model (when ``by_class``) or one per row."""
    if probs is None:
        return None
    k = len(rows)
    p = np.asarray(probs, np.float32).reshape(-1)
    if by_class and p.size > k and all(r is not None and r < p.size for r in rows):
        return [float(p[r]) for r in rows]
    if p.size == k:
        return [float(v) for v in p]
    raise ValueError(
        f"figure_grid: probs has {p.size} values for {k} rows; give one per class "
        f"of the model or one per row."
    )


def _grid_layout(
    image_hw: tuple[int, int], ncols: int, nrows: int, panel_width: float, *, labelled: bool, titled: bool
) -> tuple[float, float, float, list[list[tuple]]]:
    """The figure's size and left margin in inches, and each panel's ``rects[row][col]`` in figure
    coordinates (for ``fig.add_axes``). Panels keep the image's aspect; very tall ones are capped."""
    h, w = image_hw
    pw = float(panel_width)
    ph = pw * h / w
    if ph > 1.6 * pw:  # very tall images: cap the height, narrow the panel
        ph = 1.6 * pw
        pw = ph * w / h
    gap_x, gap_y = 0.06, 0.10
    left = 0.42 if labelled else 0.1
    top = 0.34 + (0.30 if titled else 0.0)
    bottom, right = 0.08, 0.08
    fig_w = left + ncols * pw + (ncols - 1) * gap_x + right
    fig_h = top + nrows * ph + (nrows - 1) * gap_y + bottom
    rects = [
        [
            (
                (left + c * (pw + gap_x)) / fig_w,
                (fig_h - top - (r + 1) * ph - r * gap_y) / fig_h,
                pw / fig_w,
                ph / fig_h,
            )
            for c in range(ncols)
        ]
        for r in range(nrows)
    ]
    return fig_w, fig_h, left, rects


def _draw_grid(
    fig,
    rects: list[list[tuple]],
    img: np.ndarray,
    panels: dict[str, np.ndarray],
    labels: list[str],
    *,
    show_image: bool,
    alpha: float,
    cmap,
) -> None:
    """Every panel: headers on the first row, row labels on the first column."""
    columns: list[str | None] = ([None] if show_image else []) + list(panels)
    headers = (["Image"] if show_image else []) + [METHOD_TITLES.get(n, n) for n in panels]
    for r, label in enumerate(labels):
        for c, name in enumerate(columns):
            shown = img if name is None else _panel_image(img, panels[name][r], alpha, cmap)
            _draw_panel(
                fig, rects[r][c], shown, header=headers[c] if r == 0 else None, label=label if c == 0 else ""
            )


def _panel_image(img: np.ndarray, panel, alpha: float, cmap) -> np.ndarray:
    """One method's map for one row as RGB: a gradient image, or a heatmap overlaid on ``img``."""
    a = np.asarray(panel)
    if a.ndim == 3:
        return resize_rgb(gradient_image(a), img.shape[:2])
    return overlay(img, a, alpha=alpha, cmap=cmap)


def _draw_panel(fig, rect, shown: np.ndarray, *, header: str | None, label: str) -> None:
    """One bare axes showing ``shown``, with a bold ``header`` above and ``label`` on its left."""
    ax = fig.add_axes(rect)
    ax.set(xticks=[], yticks=[])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.imshow(shown)
    if header is not None:
        ax.set_title(header, fontsize=_BASE_FONT + 0.5, fontweight="bold", pad=4)
    if label:
        ax.set_ylabel(label, fontsize=_BASE_FONT, labelpad=4, linespacing=1.25)


def _row_label(cls, class_names, prob) -> str:
    if cls is None and prob is None:
        return ""
    if cls is None:
        name = ""
    elif class_names is not None and 0 <= cls < len(class_names):
        name = str(class_names[cls])
    else:
        name = f"class {cls}"
    if prob is None:
        return name
    pct = f"{100 * prob:.1f}%" if prob >= 0.001 else f"{100 * prob:.2g}%"
    return f"{name}\n$p$ = {pct}" if name else f"$p$ = {pct}"
