"""XRAI: attributions summed over image regions, regions ranked greedily by attribution density.

The regions are Felzenszwalb segmentations at several scales (computed on the host with
scikit-image, PAIR ``saliency``'s recipe: the image rescaled to [-1, 1] and resized to
224 x 224, scales 50, 100, 150, 250, 500, 1200, sigma 0.8, minimum size 150, segments dilated
by a disk of radius 5). The greedy ranking runs on the device, jitted and batched: each round
scores every remaining region by the mean attribution of the pixels it would add (one matrix
product over all regions) and adds the best.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._inputs import input_gate, spatial_size
from .._layout import to_channels_last
from .._maps import kernel
from .._targets import Target
from ._common import check_positive_int
from .path import integrated_gradients

__all__ = ["SCALES", "xrai_segments", "XraiOptions", "xrai_kernel", "xrai"]

SCALES = (50, 100, 150, 250, 500, 1200)


def xrai_segments(image, resize: bool = True, dilation_radius: int = 5) -> np.ndarray:
    """PAIR's XRAI segments of one channels-last image ``(H, W, C)``: boolean masks ``(M, H, W)``.

    Needs scikit-image (``pip install scikit-image``).
    """
    try:
        from skimage import morphology, segmentation, transform
    except ImportError as e:  # pragma: no cover - the test extras install it
        raise ImportError("xrai: computing segments needs scikit-image (pip install scikit-image).") from e
    im = np.asarray(image, np.float64)
    shape = im.shape[:2]
    lo, hi = im.min(), im.max()
    im = (im - lo) / (hi - lo) * 2.0 - 1.0 if hi > lo else np.zeros_like(im)
    if resize:
        im = transform.resize(
            im, (224, 224), order=3, mode="constant", preserve_range=True, anti_aliasing=True
        )
    masks: list[np.ndarray] = []
    for scale in SCALES:
        seg = segmentation.felzenszwalb(im, scale=scale, sigma=0.8, min_size=150)
        if resize:
            seg = transform.resize(
                seg, shape, order=0, preserve_range=True, mode="constant", anti_aliasing=False
            ).astype(int)
        masks.extend(seg == label for label in range(seg.min(), seg.max() + 1))
    if dilation_radius:
        footprint = morphology.disk(dilation_radius)
        masks = [morphology.dilation(m, footprint=footprint) for m in masks]
    return np.stack(masks).astype(bool)


@dataclasses.dataclass(frozen=True)
class XraiOptions:
    """The static options of :func:`xrai_kernel`."""

    min_pixel_diff: int = 50
    area_threshold: float = 1.0


def _rank_one(attr, masks, options: XraiOptions):
    """The greedy ranking of one image: ``(map (H*W,), rank (H*W,))``."""
    m, n = masks.shape
    masks_f = masks.astype(attr.dtype)
    init = (
        jnp.zeros(n, bool),  # current region
        jnp.ones(m, bool),  # remaining masks
        jnp.full(n, -jnp.inf, attr.dtype),  # output map
        jnp.zeros(n, jnp.int32),  # order in which pixels were added
        jnp.zeros(m, attr.dtype),  # gain of each step
        jnp.asarray(0, jnp.int32),
    )

    def cond(state):
        current, alive, _, _, _, step = state
        return jnp.any(alive) & (jnp.mean(current) <= options.area_threshold) & (step < m)

    def body(state):
        current, alive, out, order, gains, step = state
        free = (~current).astype(attr.dtype)
        counts = masks_f @ free
        alive = alive & (counts >= options.min_pixel_diff)
        gain = jnp.where(alive, (masks_f @ (attr * free)) / jnp.maximum(counts, 1), -jnp.inf)
        k = jnp.argmax(gain)
        go = jnp.any(alive)
        added = masks[k] & ~current & go
        out = jnp.where(added, gain[k], out)
        order = jnp.where(added, step + 1, order)
        gains = gains.at[step].set(jnp.where(go, gain[k], -jnp.inf))
        return current | added, alive.at[k].set(False), out, order, gains, step + 1

    current, _, out, order, gains, steps = jax.lax.while_loop(cond, body, init)
    rest = ~current
    fill = jnp.sum(jnp.where(rest, attr, 0)) / jnp.maximum(jnp.sum(rest), 1)
    out = jnp.where(rest, fill, out)
    # Ranks: steps sorted by decreasing gain (stable), the uncovered rest last.
    valid = jnp.arange(m) < steps
    position = jnp.argsort(jnp.argsort(jnp.where(valid, -gains, jnp.inf), stable=True), stable=True)
    rank = jnp.where(order > 0, position[jnp.maximum(order - 1, 0)] + 1, jnp.sum(valid) + 1)
    return out, rank


@kernel
def xrai_kernel(attr, masks, *, options: XraiOptions):
    """XRAI's greedy ranking for a batch: ``attr`` ``(B, H, W)``, ``masks`` ``(B, M, H, W)``."""
    b, h, w = attr.shape
    flat = jax.vmap(lambda a, ms: _rank_one(a.reshape(-1), ms.reshape(ms.shape[0], -1), options))
    out, rank = flat(attr, masks)
    return out.reshape(b, h, w), rank.reshape(b, h, w)


def _masks(segments, batch: int, size) -> np.ndarray:
    """Segments as one padded boolean array ``(B, M, H, W)``."""
    per = []
    for b in range(batch):
        seg = np.asarray(segments[b])
        if seg.ndim == 2:  # an integer label image
            seg = np.stack([seg == label for label in np.unique(seg)])
        if seg.ndim != 3 or tuple(seg.shape[1:]) != tuple(size):
            raise ValueError(
                f"xrai: segments[{b}] must be boolean masks (M, {size[0]}, {size[1]}) or a label image "
                f"{tuple(size)}; got shape {seg.shape}."
            )
        per.append(seg.astype(bool))
    m = max(s.shape[0] for s in per)
    return np.stack([np.concatenate([s, np.zeros((m - s.shape[0], *size), bool)]) for s in per])


def xrai(
    fn: Callable,
    x,
    target: Target = None,
    *,
    attributions=None,
    segments=None,
    steps: int = 100,
    min_pixel_diff: int = 50,
    area_threshold: float = 1.0,
    return_ranks: bool = False,
    layout: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """XRAI: regions ranked by the density of attribution they add, as one map.

    Starting from nothing, each round adds the region (a segment at one of several scales)
    whose not-yet-covered pixels have the highest mean attribution, skipping regions that add
    fewer than ``min_pixel_diff`` pixels; every pixel's value is the gain of the round that
    covered it (pixels never covered get their mean attribution). The attribution defaults to
    Integrated Gradients averaged over a black and a white baseline (the image's minimum and
    maximum), its channels reduced by their maximum — PAIR ``saliency``'s ``XRAI`` (``full``
    algorithm), with this library's IG (Gauss-Legendre quadrature).

    Args:
      fn, x, target: as in :func:`gradcam_jax.integrated_gradients`; images ``(B, H, W, C)``
        (channels-first with ``layout=``).
      attributions: precomputed attributions ``(B, H, W)`` or shaped like the image (reduced
        by the maximum over channels); default IG as above.
      segments: per example, boolean masks ``(M, H, W)`` or an integer label image ``(H, W)``;
        default PAIR's Felzenszwalb segments (:func:`xrai_segments`, needs scikit-image).
      steps: IG steps per baseline.
      min_pixel_diff, area_threshold: PAIR's parameters and defaults.
      return_ranks: also return each pixel's region rank (1 = most important).

    Returns:
      The XRAI map ``(B, H, W)`` (and the ranks ``(B, H, W)`` with ``return_ranks``).

    References:
      Kapishnikov et al., "XRAI: Better Attributions Through Regions", ICCV 2019,
      https://arxiv.org/abs/1906.02825.
    """
    who = "xrai"
    view = input_gate(x, layout, None, who, ranks=(2,), why="XRAI segments images (B, H, W, C)")
    image = to_channels_last(jax.tree_util.tree_leaves(x)[view.leaf], view.layout)
    size = spatial_size(x, view)
    batch = image.shape[0]
    if attributions is None:
        steps = check_positive_int(steps, "steps", who)
        axes = tuple(range(1, image.ndim))
        raw = jax.tree_util.tree_leaves(x)[view.leaf]
        lo = jnp.min(raw, axis=axes, keepdims=True) * jnp.ones_like(raw)
        hi = jnp.max(raw, axis=axes, keepdims=True) * jnp.ones_like(raw)
        runs = [integrated_gradients(fn, x, target, baseline=b, steps=steps, layout=layout) for b in (lo, hi)]
        attributions = to_channels_last((runs[0] + runs[1]) / 2, view.layout)
    attr = jnp.asarray(attributions, jnp.float32)
    if attr.ndim == 4:
        attr = jnp.max(attr, axis=-1)
    if attr.shape != (batch, *size):
        raise ValueError(
            f"xrai: attributions must be (B, H, W) = {(batch, *size)} or image-shaped; got {attr.shape}."
        )
    if segments is None:
        segments = [xrai_segments(np.asarray(image[b])) for b in range(batch)]
    masks = _masks(segments, batch, size)
    options = XraiOptions(check_positive_int(min_pixel_diff, "min_pixel_diff", who, 0), float(area_threshold))
    out, ranks = xrai_kernel(attr, jnp.asarray(masks), options=options)
    return (out, ranks) if return_ranks else out
