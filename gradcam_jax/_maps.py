"""From ``(A, dA)`` to finished maps: the one options object, the token grid, the finishing.

:class:`MapOptions` holds every option that shapes a map (upsampling, normalisation, the final
ReLU, interpolation, counterfactual gradients, the token grid). It is frozen and hashable: the
single static argument of the jitted kernels (:data:`kernel`), checked once when it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._grads import Grads
from ._inputs import (
    InputView,
    check_batch,
    check_image_array,
    image_leaf,
    input_gate,
    input_view,
    spatial_size,
)
from ._layout import parse_layout
from ._targets import nan_where
from .postprocess import check_interpolation, normalize_maps, upsample_to

__all__ = [
    "MapOptions",
    "kernel",
    "to_grid",
    "finish_maps",
    "maps_from_grads",
    "check_images",
    "check_cam_input",
    "map_geometry",
]

#: ``jax.jit`` with one static argument, ``options`` (a frozen dataclass): every explainer's
#: kernel has the signature ``kernel(model, x, target, ..., *, options)``.
kernel = functools.partial(jax.jit, static_argnames=("options",))


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """How raw maps become the maps a user gets (see :func:`gradcam_jax.cam` for each field).

    ``layout`` and ``input`` say where the image is in the model's input (see
    :func:`gradcam_jax._inputs.input_view`): maps are upsampled to its spatial size and come
    back as ``(B, *spatial)``, whatever its layout.

    Examples:
      >>> from gradcam_jax._maps import MapOptions
      >>> MapOptions(grid=[7, 7], layout="nchw").grid
      (7, 7)
    """

    upsample: bool = True
    normalize: bool = True
    relu: bool = True
    interpolation: str = "bilinear"
    counterfactual: bool = False
    drop_tokens: int = 0
    grid: tuple[int, ...] | None = None
    layout: str | None = None
    input: Any = None

    def __post_init__(self):
        check_interpolation(self.interpolation)
        for name in ("upsample", "normalize", "relu", "counterfactual"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if isinstance(self.drop_tokens, bool) or int(self.drop_tokens) < 0:
            raise ValueError(
                f"drop_tokens must be an int >= 0 (leading tokens to drop); got {self.drop_tokens!r}."
            )
        object.__setattr__(self, "drop_tokens", int(self.drop_tokens))
        if self.grid is not None:
            grid = tuple(int(v) for v in self.grid)
            if not 1 <= len(grid) <= 3 or min(grid) < 1:
                raise ValueError(
                    f"grid must be positive ints, (h, w) (or (t,), (d, h, w)); got {self.grid!r}."
                )
            object.__setattr__(self, "grid", grid)
        if self.layout is not None:
            object.__setattr__(self, "layout", parse_layout(self.layout).name)
        hash(self.input)  # a key, an index or a function: it is part of a static argument


def _side(n: int, rank: int, n_tokens: int, drop_tokens: int) -> int:
    side = round(n ** (1.0 / rank))
    if side**rank != n:
        shape = "square" if rank == 2 else "cube"
        raise ValueError(
            f"The tapped layer outputs {n_tokens} tokens; after dropping {drop_tokens}, {n} "
            f"do not form a {shape} grid. Pass drop_tokens= (e.g. 1 for a class token) and/or "
            f"grid=({', '.join('hw' if rank == 2 else 'dhw')})."
        )
    return side


def _tokens_to_grid(a, drop_tokens: int, grid, rank: int):
    tokens = a[:, drop_tokens:, :]
    n = tokens.shape[1]
    if grid is None:
        grid = (n,) if rank == 1 else (_side(n, rank, a.shape[1], drop_tokens),) * rank
    if len(grid) != rank or math.prod(grid) != n:
        hint = (
            " A (B, N, C) input is read as a 1-D signal when maps are upsampled to it; for token "
            "embeddings pass upsample=False (maps on the token grid)."
            if rank == 1
            else ""
        )
        raise ValueError(
            f"grid={tuple(grid)} holds {math.prod(grid)} tokens in {len(grid)}-D, but {n} remain after "
            f"dropping {drop_tokens} and the input has {rank} spatial axes.{hint}"
        )
    return tokens.reshape((a.shape[0], *grid, a.shape[-1]))


def to_grid(a, drop_tokens: int = 0, grid: tuple[int, ...] | None = None, rank: int | None = None):
    """Bring an activation (or gradient) to ``(B, *spatial, C)`` with ``rank`` spatial axes.

    ``rank`` is the input's number of spatial axes (2 for images, the default; 1 for signals,
    3 for volumes). An activation with that many is kept; ``(B, C)`` gets size-1 spatial axes
    (no spatial extent: a method's weights are then ``dA`` itself); for images and volumes,
    tokens ``(B, N, C)`` lose ``drop_tokens`` leading tokens (a class token, register tokens)
    and are reshaped to ``grid``, by default a square (cube) ``N - drop_tokens`` side.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax._maps import to_grid
      >>> to_grid(jnp.zeros((2, 1 + 16, 8)), drop_tokens=1).shape
      (2, 4, 4, 8)
      >>> to_grid(jnp.zeros((2, 50, 8)), rank=1).shape
      (2, 50, 8)
    """
    rank = 2 if rank is None else rank
    if a.ndim == 2:
        return a.reshape((a.shape[0],) + (1,) * rank + (a.shape[1],))
    if a.ndim == rank + 2 and not (rank == 1 and (drop_tokens or grid is not None)):
        if drop_tokens or grid is not None:
            raise ValueError(
                f"drop_tokens and grid apply to token activations (B, N, C); this layer's output is "
                f"{a.shape}, which already has the input's {rank} spatial axes."
            )
        return a
    if a.ndim == 3:
        return _tokens_to_grid(a, drop_tokens, grid, rank)
    raise ValueError(
        f"The tapped layer's output has shape {a.shape}; for an input with {rank} spatial axes supported are "
        f"(B, *{rank} spatial, C), tokens (B, N, C) and (B, C). Tap another layer, pass activation_layout= "
        f"to the adapter for a channels-first layer, or reshape in a split_tap."
    )


def finish_maps(raw, options: MapOptions, size: tuple[int, ...] | None, rank: int = 2, scores=None):
    """ReLU, upsample to ``size``, normalise — in that order (the paper's convention).

    After a ReLU, the overshoot of bicubic/Lanczos kernels is clipped so that zero evidence
    stays zero. ``size`` is the image's spatial size (unused when ``options.upsample`` is off);
    ``rank`` its number of spatial axes (the maps' last ``rank`` axes).

    NaN is never turned into evidence or its absence: a raw map holding a NaN comes back all
    NaN, normalised or not, and so does the map of every example (or example-target) whose
    explained score in ``scores`` (``(B,)`` or ``(B, K)``) is NaN.
    """
    raw = raw.astype(jnp.float32)
    bad = jnp.any(jnp.isnan(raw), axis=tuple(range(-rank, 0)))
    if scores is not None:
        bad = bad | jnp.isnan(scores)
    maps = _finish(raw, options, size, rank)
    return nan_where(bad, maps)


def _finish(raw, options: MapOptions, size, rank: int):
    if options.relu:
        raw = jax.nn.relu(raw)
    if options.upsample:
        raw = upsample_to(raw, size, options.interpolation)
        if options.relu and options.interpolation not in ("nearest", "bilinear", "linear"):
            raw = jax.nn.relu(raw)
    if options.normalize:
        raw = normalize_maps(raw, rank)
    return raw


def maps_from_grads(out: Grads, method_fn: Callable, options: MapOptions, size, rank: int | None = 2):
    """One method's finished maps from one forward's :class:`Grads`: ``(B, *spatial)`` or ``(B, K, ...)``.

    ``method_fn(A, dA) -> (B, *spatial)`` is a raw-map formula of :mod:`gradcam_jax.methods`;
    ``size``/``rank`` as in :func:`finish_maps` (see :func:`map_geometry`).
    """
    rank = 2 if rank is None else rank
    a = to_grid(out.activation, options.drop_tokens, options.grid, rank).astype(jnp.float32)
    if options.normalize and all(d == 1 for d in a.shape[1:-1]):
        raise ValueError(
            f"The tapped layer's output {out.activation.shape} has no spatial extent: its map is one "
            f"number per example, which normalisation would turn into 0. Pass normalize=False and "
            f"upsample=False for that number, or tap a layer with spatial axes."
        )
    g = out.grads.astype(jnp.float32)
    if options.counterfactual:
        g = -g

    def raw_map(gk):
        return method_fn(a, to_grid(gk, options.drop_tokens, options.grid, rank))

    if out.selected.ndim == 1:
        return finish_maps(raw_map(g), options, size, rank, out.selected)
    raw = jnp.moveaxis(jax.vmap(raw_map)(g), 0, 1)  # (B, K, ...)
    return finish_maps(raw, options, size, rank, out.selected)


def check_images(x, options: MapOptions, who: str) -> InputView:
    """The input gate (:func:`~gradcam_jax._inputs.input_gate`) for an image input: its view."""
    return input_gate(x, options.layout, options.input, who)


def check_cam_input(x, options: MapOptions, who: str) -> tuple[tuple[int, ...] | None, int | None]:
    """The input gate for a CAM method, whose input need not be an image: ``map_geometry``.

    An input with spatial axes (an image, a signal, a volume) must be a non-empty floating
    batch, as everywhere; with ``upsample=False`` an input without (token ids ``(B, N)``,
    features) goes to the model as it is, once its batch is not empty.
    """
    geometry = map_geometry(x, options, who)
    check_batch(x, who)
    try:
        view = input_view(x, options.layout, options.input, who)
    except ValueError:
        return geometry  # map_geometry accepted it: tokens, at the layer's resolution
    if view.spatial_rank:
        check_image_array(image_leaf(x, view), who)
    return geometry


def map_geometry(x, options: MapOptions, who: str = "explain") -> tuple[tuple[int, ...] | None, int | None]:
    """``(size, rank)`` of the maps for input ``x``: the image's spatial size (``None`` without
    upsampling) and its number of spatial axes (``None`` when the input has none: the
    activation decides, as for a token model)."""
    if not options.upsample:
        try:
            view = input_view(x, options.layout, options.input, who)
        except ValueError:
            if options.layout is not None or options.input is not None:
                raise
            return None, None  # e.g. token ids: maps stay at the layer's resolution
        if options.layout is None and view.spatial_rank == 1:
            # (B, N, C) without layout= and without upsampling: tokens (a 2-D grid, as for a ViT's
            # embeddings); pass layout="NLC" for a 1-D signal at the layer's resolution.
            return None, None
        return None, (view.spatial_rank or None)
    view = input_view(x, options.layout, options.input, who)
    if view.spatial_rank == 0:
        shape = tuple(jax.tree_util.tree_leaves(x)[view.leaf].shape)
        raise ValueError(
            f"{who}: upsample=True resizes maps to the image in x, which must have spatial axes "
            f"((B, H, W, C), (B, T, C) or (B, D, H, W, C); channels-first with layout=); x is {shape}. "
            f"Pass upsample=False for maps at the layer's resolution."
        )
    return spatial_size(x, view), view.spatial_rank
