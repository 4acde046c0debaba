"""1-D explanations: a signal drawn as lines with its maps as heat strips (see :mod:`gradcam_jax.viz`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._grid import new_figure
from ._images import METHOD_TITLES, resize_linear

__all__ = ["signal_figure"]

_FONT = 8.5
_STYLES = ("strip", "band")


def signal_figure(
    signal,
    maps,
    *,
    names: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
    cmap="jet",
    style: str = "strip",
    alpha: float = 0.45,
    title=None,
    width: float = 7.0,
    dpi: float = 100,
    xlabel: str = "time step",
):
    """A 1-D signal with its maps: the channels as lines, each map as a heat strip underneath.

    Args:
      signal: ``(T,)`` or ``(T, C)`` (one line per channel), time first; a batch ``(B, T, C)``
        gives one figure per example.
      maps: one map ``(t,)``, ``K`` maps ``(K, t)`` (e.g. ``K`` targets), or a dict name -> ``(t,)``;
        with a batch, a leading ``B`` axis on each. Values in [0, 1] (clipped), as the explainers
        return them; a shorter map (the tapped layer's length) is resized linearly to ``T``.
      names: a legend label per channel of the signal.
      titles: a label per map (default: the dict's keys, printed nicely, or ``map k``).
      cmap: a Matplotlib colormap name or object.
      style: ``"strip"`` (a heat strip per map under the signal) or ``"band"`` (one panel per
        map, the map as a coloured band behind the signal, drawn with ``alpha``).
      alpha: the band's opacity (``style="band"``).
      title: a line above the figure (a list of them, one per example, for a batch).
      width, dpi: the figure's width in inches and its resolution.
      xlabel: the label of the time axis.

    Returns:
      A ``matplotlib.figure.Figure`` on the Agg canvas (a list for a batch): the signal's axes
      first, then one axes per strip. Save it with :func:`save_png`.

    >>> import numpy as np
    >>> x = np.sin(np.linspace(0, 6, 50))[:, None] * [1.0, 0.5]  # (T, C) = (50, 2)
    >>> fig = signal_figure(x, {"grad_cam": np.linspace(0, 1, 12)}, names=["a", "b"])
    >>> type(fig).__name__, len(fig.axes)
    ('Figure', 2)
    """
    sig = np.asarray(signal, np.float32)
    if style not in _STYLES:
        raise ValueError(f"signal_figure: style must be one of {_STYLES}; got {style!r}.")
    if sig.ndim == 3:
        options = dict(names=names, titles=titles, cmap=cmap, style=style, alpha=alpha)
        return _signal_batch(sig, maps, title, **options, width=width, dpi=dpi, xlabel=xlabel)
    lines = _signal_lines(sig, names)
    heat = signal_maps(maps, lines.shape[0], titles)
    height, _ = _heights(len(heat), style, bool(title))
    fig = new_figure(width, height, dpi)
    if style == "strip":
        _draw_strips(fig, lines, heat, names=names, cmap=cmap, xlabel=xlabel, titled=bool(title))
    else:
        _draw_bands(fig, lines, heat, names=names, cmap=cmap, alpha=alpha, xlabel=xlabel, titled=bool(title))
    if title:
        fig.text(0.01, 1 - 0.08 / fig.get_figheight(), str(title), ha="left", va="top", fontsize=_FONT + 1)
    return fig


def _signal_lines(sig: np.ndarray, names: Sequence[str] | None) -> np.ndarray:
    """The signal as ``(T, C)`` lines, checked against the channel ``names``."""
    if sig.ndim not in (1, 2) or sig.shape[0] < 1:
        raise ValueError(
            f"signal_figure: the signal must be (T,) or (T, C) (a batch (B, T, C)); got shape {sig.shape}. "
            "For images use viz.figure_grid, for volumes viz.volume_figure."
        )
    lines = sig[:, None] if sig.ndim == 1 else sig
    if names is not None and len(names) != lines.shape[1]:
        raise ValueError(f"signal_figure: {len(names)} names for a signal of {lines.shape[1]} channel(s).")
    return lines


def _signal_batch(sig: np.ndarray, maps, title, **options) -> list:
    """:func:`signal_figure` of each example of a batch ``(B, T, C)``, with its maps and title."""
    b = sig.shape[0]
    per = dict(maps) if isinstance(maps, Mapping) else {None: maps}
    for name, v in per.items():
        if np.ndim(v) < 1 or np.shape(v)[0] != b:
            where = "maps" if name is None else f"maps[{name!r}]"
            raise ValueError(
                f"signal_figure: a batch of {b} signals {sig.shape} needs {where} with a leading axis of "
                f"{b} ((B, t) or (B, K, t)); got shape {np.shape(v)}."
            )
    titles = title if isinstance(title, (list, tuple)) else [title] * b
    figs = []
    for i in range(b):
        item = {k: np.asarray(v)[i] for k, v in per.items()}
        figs.append(signal_figure(sig[i], item.get(None, item), title=titles[i], **options))
    return figs


def signal_maps(maps, length: int, titles: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """The maps of :func:`signal_figure` as ``(label, (length,) values in [0, 1])`` pairs.

    Args:
      maps: ``(t,)``, ``(K, t)`` or a dict name -> ``(t,)``, with ``t <= length``.
      length: the signal's length ``T``; shorter maps are resized linearly to it.
      titles: labels replacing the default ones (the dict's keys, or ``map k``).

    Returns:
      A list of ``(label, map)``, one per map, each map ``float32 (length,)``.

    >>> [(label, m.shape) for label, m in signal_maps({"grad_cam": np.ones(4)}, 8)]
    [('Grad-CAM', (8,))]
    """
    if isinstance(maps, Mapping):
        pairs = [(METHOD_TITLES.get(str(k), str(k)), np.asarray(v, np.float32)) for k, v in maps.items()]
    else:
        a = np.asarray(maps, np.float32)
        stack = a[None] if a.ndim == 1 else a
        pairs = [("map" if a.ndim == 1 else f"map {k}", m) for k, m in enumerate(stack)]
    if not pairs:
        raise ValueError("signal_figure: no maps to draw.")
    if titles is not None:
        if len(titles) != len(pairs):
            raise ValueError(f"signal_figure: {len(titles)} titles for {len(pairs)} map(s).")
        pairs = [(str(t), m) for t, (_, m) in zip(titles, pairs, strict=True)]
    for label, m in pairs:
        if m.ndim != 1 or not 1 <= m.shape[0] <= length:
            raise ValueError(
                f"signal_figure: the map {label!r} has shape {m.shape}; each map must be (t,) with t <= T = "
                f"{length} (the signal's length; K maps as (K, t) or a dict). A map longer than the signal "
                "often means a channels-first signal: give it as (T, C)."
            )
    return [(label, np.clip(np.nan_to_num(resize_linear(m, (length,))), 0.0, 1.0)) for label, m in pairs]


# --------------------------------------------------------------------------------------------
# Layout and drawing
# --------------------------------------------------------------------------------------------

# Inches: the signal panel, a strip, the gaps, and the margins around them.
_SIGNAL_H, _STRIP_H, _STRIP_GAP, _BAND_GAP = 1.7, 0.3, 0.05, 0.32
_LEFT, _RIGHT, _TOP, _BOTTOM, _TITLE = 1.0, 0.2, 0.15, 0.5, 0.3


def _heights(k: int, style: str, titled: bool) -> tuple[float, list[tuple[float, float]]]:
    """The figure's height, and each panel's (bottom, height) in inches from the figure's bottom:
    the signal then ``k`` strips (``"strip"``), or ``k`` signal panels (``"band"``), top to bottom."""
    if style == "strip":
        sizes = [(_SIGNAL_H, 0.12)] + [(_STRIP_H, _STRIP_GAP)] * k
    else:
        sizes = [(_SIGNAL_H, _BAND_GAP)] * k
    top = _TOP + (_TITLE if titled else 0.0) + (_BAND_GAP - 0.1 if style == "band" else 0.0)
    total = top + sum(h for h, _ in sizes) + sum(g for _, g in sizes[1:]) + _BOTTOM
    panels, y = [], total - top
    for i, (h, gap) in enumerate(sizes):
        y -= (gap if i else 0.0) + h
        panels.append((y, h))
    return total, panels


def _axes(fig, bottom: float, height: float, sharex=None):
    """An axes spanning the figure's width between the margins, ``bottom``/``height`` in inches."""
    w, h = fig.get_figwidth(), fig.get_figheight()
    rect = (_LEFT / w, bottom / h, 1 - (_LEFT + _RIGHT) / w, height / h)
    return fig.add_axes(rect, sharex=sharex)


def _plot_lines(ax, lines: np.ndarray, names: Sequence[str] | None) -> None:
    t = lines.shape[0]
    for c in range(lines.shape[1]):
        ax.plot(np.arange(t), lines[:, c], lw=1.1, zorder=2, label=None if names is None else str(names[c]))
    ax.set_xlim(-0.5, t - 0.5)
    ax.tick_params(labelsize=_FONT - 1)
    if names is not None:
        ax.legend(fontsize=_FONT - 1, loc="upper right", framealpha=0.8)


def _heat_image(ax, m: np.ndarray, cmap, extent, **kw) -> None:
    """``m`` as one row of coloured cells, cell ``i`` centred on time step ``i``."""
    ax.imshow(
        m[None, :], aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", extent=extent, **kw
    )


def _draw_strips(fig, lines, heat, *, names, cmap, xlabel: str, titled: bool) -> None:
    """The signal on top, one labelled heat strip per map below it, the time axis on the last."""
    t = lines.shape[0]
    _, panels = _heights(len(heat), "strip", titled)
    ax_signal = _axes(fig, *panels[0])
    _plot_lines(ax_signal, lines, names)
    ax_signal.tick_params(labelbottom=False)
    for i, ((label, m), (bottom, height)) in enumerate(zip(heat, panels[1:], strict=True)):
        ax = _axes(fig, bottom, height, sharex=ax_signal)
        _heat_image(ax, m, cmap, (-0.5, t - 0.5, 0.0, 1.0))
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=_FONT, labelpad=6)
        ax.tick_params(labelbottom=i == len(heat) - 1, labelsize=_FONT - 1)
    fig.axes[-1].set_xlabel(xlabel, fontsize=_FONT)


def _draw_bands(fig, lines, heat, *, names, cmap, alpha: float, xlabel: str, titled: bool) -> None:
    """One panel per map: the map as a coloured band behind the signal, titled with its label."""
    t = lines.shape[0]
    lo, hi = float(lines.min()), float(lines.max())
    pad = 0.06 * (hi - lo) if hi > lo else 0.5
    extent = (-0.5, t - 0.5, lo - pad, hi + pad)
    _, panels = _heights(len(heat), "band", titled)
    first = None
    for i, ((label, m), (bottom, height)) in enumerate(zip(heat, panels, strict=True)):
        ax = _axes(fig, bottom, height, sharex=first)
        first = first or ax
        _heat_image(ax, m, cmap, extent, alpha=alpha, zorder=0)
        _plot_lines(ax, lines, names if i == 0 else None)
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(label, loc="left", fontsize=_FONT, pad=3)
        ax.tick_params(labelbottom=i == len(heat) - 1)
    fig.axes[-1].set_xlabel(xlabel, fontsize=_FONT)
