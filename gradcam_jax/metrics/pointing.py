"""The pointing game: is a map's maximum on the object? Maps of any spatial rank."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import check_map_batch, nan_examples
from .localization import boxes_to_masks

__all__ = ["pointing_game"]


@jax.jit
def _pointing_jit(maps, masks, tolerance):
    b, spatial = maps.shape[0], maps.shape[1:]
    flat = maps.reshape(b, -1).astype(jnp.float32)
    peak = jnp.unravel_index(jnp.argmax(flat, axis=-1), spatial)  # first maximum, row-major
    d2 = 0
    for axis, (size, at) in enumerate(zip(spatial, peak, strict=True)):
        pos = jnp.arange(size).reshape((1,) + tuple(size if d == axis else 1 for d in range(len(spatial))))
        d2 = d2 + (pos - at.reshape((b,) + (1,) * len(spatial))) ** 2
    near = jnp.asarray(d2).astype(jnp.float32) <= tolerance * tolerance
    return jnp.any(masks & near, axis=tuple(range(1, maps.ndim))) & ~nan_examples(maps)  # NaN: a miss


def pointing_game(maps, masks, tolerance: float = 0):
    """Pointing game: is each map's maximum on the object?

    The *peak* is the position holding the map's maximum (the first one in row-major order
    when several share it). A hit when some object position lies within Euclidean distance
    ``tolerance`` of the peak: ``min over object positions q of |q - peak| <= tolerance``
    (position centres, so ``tolerance=0`` means the peak itself is on the object). Zhang et
    al. use a 15-pixel tolerance (``tolerance=15``) to forgive small misalignments. The
    accuracy is ``hits / (hits + misses)``: the mean of the result.

    Maps of any spatial rank: images ``(B, H, W)``, signals ``(B, T)`` (the object an interval
    or any set of time steps), volumes and videos ``(B, D, H, W)`` (distances in voxels, every
    axis alike).

    Args:
      maps: ``(B, *spatial)``.
      masks: the objects: boolean masks shaped like the maps, or, for images only, boxes
        ``(B, 4)`` as inclusive ``(y0, x0, y1, x1)`` (use :func:`boxes_to_masks` with ``valid``
        for several boxes).
      tolerance: in positions (pixels; default 0; the customary value for images is 15).

    Returns:
      ``(B,)`` bool hits. A map holding a NaN points nowhere: a miss, never a hit
      (:func:`evaluate` reports it as NaN). A batch of 0 maps is refused.

    References:
      Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016, §5.1,
      https://arxiv.org/abs/1608.00507.
    """
    maps = check_map_batch(maps, "pointing_game")
    if not 2 <= maps.ndim <= 4:
        raise ValueError(
            f"pointing_game: maps must be (B, *spatial): (B, H, W), (B, T) or (B, D, H, W); got shape "
            f"{maps.shape}."
        )
    masks = jnp.asarray(masks)
    if maps.ndim == 3 and masks.ndim == 2 and masks.shape == (maps.shape[0], 4):
        masks = boxes_to_masks(masks, maps.shape[1:])
    if masks.shape != maps.shape:
        boxes = f" or boxes ({maps.shape[0]}, 4)" if maps.ndim == 3 else " (boxes are for 2-D maps only)"
        raise ValueError(
            f"pointing_game: masks must be boolean masks shaped like the maps {maps.shape}{boxes}; "
            f"got shape {masks.shape}."
        )
    return _pointing_jit(maps, masks.astype(bool), jnp.asarray(tolerance, jnp.float32))
