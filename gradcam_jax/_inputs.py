"""Which part of a model's input is the image, and in what layout.

A model's input ``x`` may be one array or a pytree (a dict of arrays, a tuple for a two-input
model). One leaf of it is *the image*: maps are upsampled to its spatial size, and the
pixel-space methods (gradients, Guided Backprop, SmoothGrad, occlusion, Score-CAM's masking,
Guided Grad-CAM) act on it. Other leaves pass through unchanged.

:func:`input_view` finds that leaf (``input=``: a key, an index, or a callable picking it;
by default the only floating leaf of rank >= 3) and its :class:`~gradcam_jax._layout.Layout`
(``layout=``; by default channels-last by rank, refused when it looks channels-first). All of
it is decided from shapes, so under ``jit`` it costs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._layout import Layout, from_channels_last, image_layout, to_channels_last

__all__ = [
    "InputView",
    "input_view",
    "input_gate",
    "check_image_array",
    "check_batch",
    "image_leaf",
    "image_of",
    "with_image",
    "spatial_size",
    "image_fn",
]


@dataclasses.dataclass(frozen=True)
class InputView:
    """Where the image is in an input pytree (``leaf``: its flat index) and its layout."""

    leaf: int
    layout: Layout

    @property
    def spatial_rank(self) -> int:
        return self.layout.spatial_rank


def leaf_index(x, input: Any = None, who: str = "explain") -> int:
    """The flat index of the image leaf of ``x`` (see :func:`input_view`)."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    if not leaves:
        raise ValueError(f"{who}: the input holds no arrays.")
    if input is None:
        if len(leaves) == 1:
            return 0
        images = [
            i
            for i, v in enumerate(leaves)
            if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) and v.ndim >= 3
        ]
        if len(images) != 1:
            found = "none" if not images else f"{len(images)}"
            raise ValueError(
                f"{who}: the input is a pytree with {len(leaves)} arrays and {found} floating arrays of rank "
                f">= 3 could be the image. Pass input= (a key, an index, or a callable picking the image)."
            )
        return images[0]
    positions = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
    try:
        picked = input(positions) if callable(input) else positions[input]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{who}: input={input!r} does not pick an array of the input ({e}).") from None
    if not isinstance(picked, int):
        raise ValueError(f"{who}: input={input!r} must pick one array of the input, not a sub-tree.")
    return picked


def input_view(x, layout: str | Layout | None = None, input: Any = None, who: str = "explain") -> InputView:
    """The image leaf of ``x`` and its layout (see the module docstring).

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax._inputs import input_view
      >>> v = input_view({"image": jnp.zeros((2, 3, 8, 8)), "age": jnp.zeros((2,))}, "NCHW")
      >>> v.leaf, v.layout.name
      (1, 'NCHW')
    """
    leaf = leaf_index(x, input, who)
    image = jax.tree_util.tree_leaves(x)[leaf]
    if not hasattr(image, "shape"):
        raise TypeError(f"{who}: the image must be an array; got {type(image).__name__}.")
    return InputView(leaf, image_layout(tuple(image.shape), layout, who))


#: How the gate describes an input by its spatial rank.
KINDS = {
    0: "features without spatial axes",
    1: "a signal batch",
    2: "an image batch",
    3: "a volume (video) batch",
}

SPATIAL = (
    "it must have spatial axes: images (B, H, W, C), signals (B, T, C) or volumes (B, D, H, W, C) "
    "(channels-first with layout=)"
)


def check_batch(x, who: str, arg: str = "x") -> None:
    """Refuse an empty batch (every explainer and metric does, with this message)."""
    leaves = jax.tree_util.tree_leaves(x)
    shape = tuple(getattr(leaves[0], "shape", ())) if leaves else ()
    if shape and shape[0] == 0:
        raise ValueError(
            f"{who}: {arg} is an empty batch (shape {shape}): there is nothing to explain. Explainers and "
            f"metrics refuse a batch of 0 examples rather than return empty results; skip empty batches."
        )


def check_image_array(image, who: str, arg: str = "x") -> None:
    """The gate's checks on the model's input: a non-empty batch of floating values.

    One message for every explainer and metric: integer images (``uint8`` pixels) are not the
    model's input, and explaining them would differentiate through a cast, or not at all.
    """
    check_batch(image, who, arg)
    dtype = getattr(image, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{who}: {arg} has dtype {dtype}; explainers and metrics take the model's input, which is "
            f"floating. Convert it with {arg}.astype(jnp.float32) (or the model's preprocess)."
        )


def input_gate(
    x,
    layout: str | Layout | None = None,
    input: Any = None,
    who: str = "explain",
    *,
    arg: str = "x",
    ranks: tuple[int, ...] | None = (1, 2, 3),
    why: str | None = None,
) -> InputView:
    """The one input check of the explainers and metrics: returns the image's :class:`InputView`.

    In order: the image leaf of a pytree (``input=``) and its layout (``layout=``; a batch that
    looks channels-first is refused without it), its spatial rank (one of ``ranks``; ``why``
    says why another is refused), a non-empty batch and a floating dtype. Shapes and dtypes
    only: under ``jit`` it costs nothing. ``arg`` names the argument in messages.
    """
    view = input_view(x, layout, input, who)
    image = image_leaf(x, view)
    if ranks is not None and view.spatial_rank not in ranks:
        raise ValueError(
            f"{who}: {arg} is {KINDS.get(view.spatial_rank, 'an array')} of shape {tuple(image.shape)}, but "
            f"{why or SPATIAL}."
        )
    check_image_array(image, who, arg)
    return view


def image_leaf(x, view: InputView):
    """The image of ``x`` as given (in its own layout)."""
    return jax.tree_util.tree_leaves(x)[view.leaf]


def image_of(x, view: InputView):
    """The image of ``x``, channels-last ``(B, *spatial, C)``."""
    return to_channels_last(jax.tree_util.tree_leaves(x)[view.leaf], view.layout)


def with_leaf(x, leaf: int, value):
    """``x`` with its ``leaf``-th array replaced by ``value`` (as is)."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    leaves[leaf] = value
    return jax.tree_util.tree_unflatten(treedef, leaves)


def with_image(x, view: InputView, image_cl):
    """``x`` with its image replaced by ``image_cl`` (channels-last; converted back to the layout)."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    leaves[view.leaf] = from_channels_last(image_cl, view.layout).astype(leaves[view.leaf].dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def spatial_size(x, view: InputView) -> tuple[int, ...]:
    """The spatial sizes of the image of ``x``: ``(H, W)``, ``(T,)`` or ``(D, H, W)``."""
    return view.layout.spatial_shape(tuple(jax.tree_util.tree_leaves(x)[view.leaf].shape))


def image_fn(fn: Callable, x, view: InputView) -> Callable:
    """``image_cl -> fn(x with that image)``: a function of the image alone."""
    return lambda image_cl: fn(with_image(x, view, image_cl))
