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
* :func:`save_png` / :func:`png_bytes` — write a figure or an image.

All functions accept a single example or a batch (leading batch axis).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["overlay", "gradient_image", "figure_grid", "save_png", "png_bytes", "resize_map", "METHOD_TITLES"]

#: How method names are printed in figure headers.
METHOD_TITLES = {
    "grad_cam": "Grad-CAM",
    "grad_cam_plus_plus": "Grad-CAM++",
    "xgrad_cam": "XGrad-CAM",
    "hires_cam": "HiResCAM",
    "layer_cam": "LayerCAM",
    "eigen_cam": "Eigen-CAM",
    "eigen_grad_cam": "Eigen-Grad-CAM",
    "score_cam": "Score-CAM",
    "ablation_cam": "Ablation-CAM",
    "cam": "CAM",
    "guided_backprop": "Guided Backprop",
    "deconvnet": "Deconvnet",
    "guided_grad_cam": "Guided Grad-CAM",
}


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def _as_uint8_image(image) -> np.ndarray:
    """``uint8`` RGB from uint8, bool, or float in [0, 1]; gray and RGBA handled."""
    im = np.asarray(image)
    if im.dtype == np.uint8:
        out = im
    elif im.dtype == bool:
        out = im.astype(np.uint8) * 255
    elif np.issubdtype(im.dtype, np.floating):
        out = np.clip(np.nan_to_num(im.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(im.dtype, np.integer):
        out = np.clip(im, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"Cannot show an image of dtype {im.dtype}.")
    if out.ndim >= 2 and (out.ndim == 2 or out.shape[-1] not in (1, 3, 4)):
        out = out[..., None]  # gray (…, H, W)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    return out


def resize_map(m, size) -> np.ndarray:
    """Bilinear resize of the last two axes of ``m`` (float maps) to ``size = (H, W)``."""
    from PIL import Image

    m = np.asarray(m, np.float32)
    h, w = int(size[0]), int(size[1])
    if m.shape[-2:] == (h, w):
        return m
    flat = m.reshape((-1,) + m.shape[-2:])
    images = (Image.fromarray(np.ascontiguousarray(f, np.float32)) for f in flat)
    out = np.stack([np.asarray(im.resize((w, h), Image.Resampling.BILINEAR)) for im in images])
    return out.reshape(m.shape[:-2] + (h, w))


def _resize_rgb(img: np.ndarray, size) -> np.ndarray:
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def _colormap(cmap):
    import matplotlib

    if isinstance(cmap, str):
        return matplotlib.colormaps[cmap]
    return cmap


def overlay(image, heatmap, alpha: float = 0.5, cmap="jet") -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Args:
      image: ``(H, W, 3)`` or a batch ``(B, H, W, 3)``; ``uint8``, or floats in [0, 1].
      heatmap: ``(h, w)`` or ``(B, h, w)`` values in [0, 1] (e.g. :func:`gradcam_jax.grad_cam`
        maps); resized bilinearly to ``(H, W)`` when its size differs. A map with a class axis
        ``(K, h, w)`` (or ``(B, K, h, w)``) gives ``K`` overlays of the same image.
      alpha: the heatmap's weight; ``0`` shows only the image, ``1`` only the heatmap.
      cmap: a Matplotlib colormap name or object (``"jet"``, the usual Grad-CAM look;
        ``"inferno"`` or ``"turbo"`` are perceptually kinder).

    Returns:
      ``uint8`` RGB: ``(H, W, 3)``, ``(B, H, W, 3)``, or with the extra class axis of
      ``heatmap``.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
    img = _as_uint8_image(image)
    if img.ndim not in (3, 4):
        raise ValueError(f"overlay: image must be (H, W, 3) or (B, H, W, 3); got shape {img.shape}.")
    hm = np.nan_to_num(np.asarray(heatmap, np.float32))
    lead_img = img.shape[:-3]
    if hm.ndim < 2:
        raise ValueError(f"overlay: heatmap must be (h, w) or batched; got shape {hm.shape}.")
    lead_hm = hm.shape[:-2]
    # Accept (…, h, w) whose leading axes extend the image's (batch, then classes).
    if lead_hm[: len(lead_img)] != lead_img:
        raise ValueError(
            f"overlay: {img.shape[0] if lead_img else 1} image(s) of shape {img.shape}, but heatmap "
            f"of shape {hm.shape}: give one (h, w) map per image, or (K, h, w) per image."
        )
    hm = resize_map(np.clip(hm, 0.0, 1.0), img.shape[-3:-1])
    colours = _colormap(cmap)(hm)[..., :3].astype(np.float32)  # (…, H, W, 3) in [0, 1]
    extra = hm.ndim - 2 - len(lead_img)
    base = img.astype(np.float32) / 255.0
    base = base.reshape(lead_img + (1,) * extra + img.shape[-3:])
    out = (1.0 - alpha) * base + alpha * colours
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gradient_image(grad, contrast: float = 0.15) -> np.ndarray:
    """An input-gradient map ``(…, H, W, C)`` as a viewable ``uint8`` RGB image.

    Each map is centred on grey and scaled by its own standard deviation
    (``0.5 + contrast * (g - mean) / std``, clipped to [0, 1]) — the usual way Guided Backprop
    and Guided Grad-CAM are shown. An all-zero map is plain grey.
    """
    g = np.nan_to_num(np.asarray(grad, np.float32))
    if g.ndim < 3:
        raise ValueError(f"gradient_image: expected (..., H, W, C) input gradients; got shape {g.shape}.")
    axes = (-3, -2, -1)
    mean = g.mean(axis=axes, keepdims=True)
    std = g.std(axis=axes, keepdims=True)
    z = np.where(std > 0, (g - mean) / np.where(std > 0, std, 1.0), 0.0)
    return _as_uint8_image(np.clip(0.5 + contrast * z, 0.0, 1.0))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float, dpi: float):
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
    img = _as_uint8_image(image)
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
        raise ValueError(f"figure_grid: image must be (H, W, 3) or (B, H, W, 3); got {img.shape}.")
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
    fig = _new_figure(fig_w, fig_h, dpi)
    _draw_grid(fig, rects, img, panels, labels, show_image=show_image, alpha=alpha, cmap=cmap)
    if title:
        fig.text(
            left / fig_w, 1 - 0.16 / fig_h, title, ha="left", va="top", fontsize=_BASE_FONT, color="0.25"
        )
    return fig


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
        return _resize_rgb(gradient_image(a), img.shape[:2])
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


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def png_bytes(fig_or_image, dpi: float | None = None) -> bytes:
    """A figure (or a ``uint8`` image) encoded as PNG."""
    buf = io.BytesIO()
    _write_png(fig_or_image, buf, dpi)
    return buf.getvalue()


def save_png(fig_or_image, path: str | os.PathLike, dpi: float | None = None) -> str:
    """Write a Matplotlib figure, or an image array (``uint8``, or floats in [0, 1]), as PNG.

    Returns the path written. Parent folders are created.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        _write_png(fig_or_image, f, dpi)
    return path


def _write_png(obj, f, dpi):
    if hasattr(obj, "savefig"):
        obj.savefig(
            f,
            format="png",
            dpi=dpi or obj.dpi,
            facecolor=obj.get_facecolor(),
            metadata={"Software": "gradcam_jax"},
        )
        return
    from PIL import Image

    img = _as_uint8_image(obj)
    if img.ndim != 3:
        raise ValueError(
            f"save_png: an image must be (H, W, 3); got shape {img.shape}. Save batch items one by one."
        )
    Image.fromarray(img).save(f, format="PNG")
