"""Smoothing and fusing maps: test-time augmentation (``aug_smooth=True`` on every CAM method)
and the fusion of several layers' maps (``fuse=`` with a multi-layer tap).

The image is augmented with horizontal flips x intensity factors (``x``, ``0.9 x``, ``1.1 x``
and the same flipped: pytorch-grad-cam's default ``ttach`` transforms, ``HorizontalFlip`` and
``Multiply([0.9, 1, 1.1])``); the six copies run as one ``vmap``-ed batch through a method's
computation, each copy's finished map is mapped back (flipped maps flipped again) and the six
are averaged. Eigen smoothing is a property of a formula: see
:func:`gradcam_jax.methods.eigen_smoothed`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._inputs import image_of, input_view, with_image
from ._maps import MapOptions
from .postprocess import normalize_maps

__all__ = [
    "AUG_FACTORS",
    "N_AUGMENTATIONS",
    "augmented_maps",
    "check_aug_smooth",
    "FUSIONS",
    "check_fuse",
    "fuse_maps",
]

#: The intensity factors of the augmentations; each is used on the image and on its mirror image.
AUG_FACTORS = (0.9, 1.0, 1.1)
N_AUGMENTATIONS = 2 * len(AUG_FACTORS)


def check_aug_smooth(x, options: MapOptions, who: str) -> None:
    """``aug_smooth`` flips images left-right: refuse inputs that have no width axis."""
    view = input_view(x, options.layout, options.input, who)
    if view.spatial_rank != 2:
        raise ValueError(
            f"{who}: aug_smooth=True averages the maps of left-right flipped and brightness-scaled copies "
            f"of an image (B, H, W, C); this input has {view.spatial_rank} spatial axes. Pass "
            f"aug_smooth=False, or average maps of your own augmentations."
        )


def augmented_maps(explain: Callable, x, options: MapOptions, who: str):
    """The mean of ``explain`` over the augmented copies of ``x``'s image, mapped back.

    ``explain(x) -> (maps, extra)``: finished maps whose last axis is the image's width (at the
    image's resolution or the layer's), and anything else. Every copy goes through one
    ``vmap``-ed call (one program for all six). Returns ``(mean_maps, extra)`` with ``extra``
    stacked over the copies (leading axis ``N_AUGMENTATIONS``). With ``options.normalize`` the
    mean is normalised to [0, 1] again; NaN in any copy makes the map NaN.
    """
    view = input_view(x, options.layout, options.input, who)
    image = image_of(x, view)  # (B, H, W, C)
    mirror = jnp.flip(image, axis=2)
    copies = jnp.stack([image * f for f in AUG_FACTORS] + [mirror * f for f in AUG_FACTORS])
    maps, extra = jax.vmap(lambda im: explain(with_image(x, view, im)))(copies)
    n = len(AUG_FACTORS)
    maps = jnp.concatenate([maps[:n], jnp.flip(maps[n:], axis=-1)])
    mean = jnp.mean(maps, axis=0)
    if options.normalize:
        mean = normalize_maps(mean, 2)
    return mean, extra


#: How :func:`fuse_maps` combines several layers' maps.
FUSIONS = ("mean", "max", "layer_cam")


def check_fuse(fuse, options: MapOptions, who: str) -> str:
    """``fuse`` if it is one of :data:`FUSIONS` and the maps are brought to the input's size."""
    if fuse not in FUSIONS:
        raise ValueError(f"{who}: fuse={fuse!r} is not one of {', '.join(map(repr, FUSIONS))}.")
    if not options.upsample:
        raise ValueError(
            f"{who}: fuse={fuse!r} combines maps of layers of different resolutions at the input's size; "
            f"pass upsample=True (or explain one layer, tap.select(name), with upsample=False)."
        )
    return fuse


def fuse_maps(layer_maps, fuse: str, normalize: bool, rank: int = 2, gamma: float = 2.0):
    """Combine several layers' finished maps (each ReLU-ed, upsampled, normalised to [0, 1]).

    ``"mean"``: their mean (pytorch-grad-cam's multi-layer behaviour); ``"max"``: their
    element-wise maximum; ``"layer_cam"``: each map ``M`` scaled to ``tanh(gamma M)`` (LayerCAM's
    eq. 9, which lifts the weak responses of shallow layers), then the element-wise maximum
    (torchcam's ``LayerCAM.fuse_cams``). The result is normalised again when ``normalize``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax._smoothing import fuse_maps
      >>> fuse_maps([jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0]])], "max", False).tolist()
      [[1.0, 1.0]]
    """
    stack = jnp.stack(layer_maps)
    if fuse == "mean":
        fused = jnp.mean(stack, axis=0)
    elif fuse == "max":
        fused = jnp.max(stack, axis=0)
    else:
        fused = jnp.max(jnp.tanh(gamma * stack), axis=0)
    return normalize_maps(fused, rank) if normalize else fused
