"""Array layouts: where the batch, the spatial axes and the channels sit.

The library computes channels-last: inputs ``(B, *spatial, C)``, activations
``(B, *spatial, C)``, maps ``(B, *spatial)``. A :class:`Layout` names another arrangement —
channels-first ``"NCHW"``, 1-D ``"NLC"`` / ``"NCL"``, 3-D ``"NDHWC"`` / ``"NCDHW"`` — and
converts to and from channels-last, so that a model that takes or produces channels-first
arrays is explained without a silent transposition error.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["Layout", "LAYOUTS", "parse_layout", "image_layout", "to_channels_last", "from_channels_last"]

#: Known layouts: name -> (spatial rank, channels first).
LAYOUTS: dict[str, tuple[int, bool]] = {
    "NC": (0, False),
    "NLC": (1, False),
    "NWC": (1, False),
    "NCL": (1, True),
    "NCW": (1, True),
    "NHWC": (2, False),
    "NCHW": (2, True),
    "NDHWC": (3, False),
    "NCDHW": (3, True),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named layout: ``spatial_rank`` spatial axes, channels first or last.

    Examples:
      >>> from gradcam_jax._layout import parse_layout
      >>> parse_layout("NCHW")
      Layout(name='NCHW', spatial_rank=2, channels_first=True)
    """

    name: str
    spatial_rank: int
    channels_first: bool

    @property
    def ndim(self) -> int:
        """The rank of an array in this layout (batch + spatial + channels)."""
        return self.spatial_rank + 2 if self.spatial_rank else 2

    def spatial_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial sizes of an array of ``shape`` in this layout."""
        return tuple(shape[2:]) if self.channels_first else tuple(shape[1:-1])

    def channel_axis(self) -> int:
        return 1 if self.channels_first else -1


def parse_layout(layout: str | Layout) -> Layout:
    """A :class:`Layout` from its name (``"NHWC"``, ``"NCHW"``, ``"NLC"``, ``"NCDHW"``...)."""
    if isinstance(layout, Layout):
        return layout
    if not isinstance(layout, str) or layout.upper() not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}.")
    name = layout.upper()
    rank, first = LAYOUTS[name]
    return Layout(name, rank, first)


def _ambiguous(shape: tuple[int, ...]) -> bool:
    """A batch that could be channels-first: a small axis 1 and a larger last axis."""
    return len(shape) >= 4 and shape[1] in (1, 3, 4) and shape[-1] > 4


def image_layout(shape: tuple[int, ...], layout: str | Layout | None, who: str) -> Layout:
    """The layout of an input batch of ``shape``: the one given, or channels-last by its rank.

    With ``layout=None`` a batch that looks channels-first (``x.shape[1]`` is 1, 3 or 4 and the
    last axis is larger) is refused rather than guessed: the maps would be silently wrong.
    """
    if layout is not None:
        lay = parse_layout(layout)
        if len(shape) != lay.ndim:
            raise ValueError(
                f"{who}: layout={lay.name!r} needs a {lay.ndim}-D input; got shape {tuple(shape)}."
            )
        return lay
    if _ambiguous(shape):
        first = {4: "NCHW", 5: "NCDHW"}.get(len(shape), "NCHW")
        last = {4: "NHWC", 5: "NDHWC"}.get(len(shape), "NHWC")
        raise ValueError(
            f"{who}: the input {tuple(shape)} looks channels-first (axis 1 has {shape[1]} entries, the "
            f"last axis {shape[-1]}). Say which it is: layout={first!r} for channels-first, or "
            f"layout={last!r} if the last axis really holds the channels."
        )
    by_rank = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}
    if len(shape) not in by_rank:
        raise ValueError(
            f"{who}: an input of shape {tuple(shape)} has no default layout; inputs are (B, C), (B, T, C), "
            f"(B, H, W, C) or (B, D, H, W, C) (pass layout= for channels-first ones)."
        )
    return parse_layout(by_rank[len(shape)])


def to_channels_last(a, layout: Layout):
    """``a`` in ``layout`` -> channels-last."""
    return jnp.moveaxis(a, 1, -1) if layout.channels_first and a.ndim > 2 else a


def from_channels_last(a, layout: Layout):
    """Channels-last ``a`` -> ``layout``."""
    return jnp.moveaxis(a, -1, 1) if layout.channels_first and a.ndim > 2 else a
