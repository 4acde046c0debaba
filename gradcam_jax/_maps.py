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

import jax
import jax.numpy as jnp

from ._grads import Grads
from .postprocess import check_interpolation, normalize_maps, upsample_to

__all__ = [
    "MapOptions",
    "kernel",
    "to_grid",
    "finish_maps",
    "maps_from_grads",
    "check_image_batch",
    "map_size",
]

#: ``jax.jit`` with one static argument, ``options`` (a frozen dataclass): every explainer's
#: kernel has the signature ``kernel(model, x, target, ..., *, options)``.
kernel = functools.partial(jax.jit, static_argnames=("options",))


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """How raw maps become the maps a user gets (see :func:`gradcam_jax.cam` for each field).

    Examples:
      >>> from gradcam_jax._maps import MapOptions
      >>> MapOptions(grid=[7, 7]).grid
      (7, 7)
    """

    upsample: bool = True
    normalize: bool = True
    relu: bool = True
    interpolation: str = "bilinear"
    counterfactual: bool = False
    drop_tokens: int = 0
    grid: tuple[int, int] | None = None

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
            if len(grid) != 2 or min(grid) < 1:
                raise ValueError(f"grid must be a pair of positive ints (h, w); got {self.grid!r}.")
            object.__setattr__(self, "grid", grid)


def _square_side(n: int, n_tokens: int, drop_tokens: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"The tapped layer outputs {n_tokens} tokens; after dropping {drop_tokens}, {n} "
            f"do not form a square grid. Pass drop_tokens= (e.g. 1 for a class token) and/or "
            f"grid=(h, w)."
        )
    return side


def to_grid(a, drop_tokens: int = 0, grid: tuple[int, int] | None = None):
    """Bring an activation (or gradient) to ``(B, h, w, C)``.

    ``(B, h, w, C)`` is kept; ``(B, C)`` becomes ``(B, 1, 1, C)`` (no spatial axes: a method's
    weights are then ``dA`` itself); tokens ``(B, N, C)`` lose ``drop_tokens`` leading tokens
    (a class token, register tokens) and are reshaped to ``grid = (h, w)``, by default the
    square ``sqrt(N - drop_tokens)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax._maps import to_grid
      >>> to_grid(jnp.zeros((2, 1 + 16, 8)), drop_tokens=1).shape
      (2, 4, 4, 8)
    """
    if a.ndim == 4:
        if drop_tokens or grid is not None:
            raise ValueError(
                "drop_tokens and grid apply to token activations (B, N, C); "
                "this layer's output is (B, h, w, C)."
            )
        return a
    if a.ndim == 2:
        return a[:, None, None, :]
    if a.ndim == 3:
        tokens = a[:, drop_tokens:, :]
        n = tokens.shape[1]
        if grid is None:
            side = _square_side(n, a.shape[1], drop_tokens)
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise ValueError(
                f"grid={tuple(grid)} holds {grid[0] * grid[1]} tokens, "
                f"but {n} remain after dropping {drop_tokens}."
            )
        return tokens.reshape(a.shape[0], grid[0], grid[1], a.shape[-1])
    raise ValueError(
        f"The tapped layer's output has shape {a.shape}; supported are (B, h, w, C), tokens (B, N, C) "
        f"and (B, C). Tap another layer, or reshape in a split_tap."
    )


def finish_maps(raw, options: MapOptions, size: tuple[int, int] | None):
    """ReLU, upsample to ``size``, normalise — in that order (the paper's convention).

    After a ReLU, the overshoot of bicubic/Lanczos kernels is clipped so that zero evidence
    stays zero. ``size`` is the input's ``(H, W)`` (unused when ``options.upsample`` is off).
    """
    raw = raw.astype(jnp.float32)
    if options.relu:
        raw = jax.nn.relu(raw)
    if options.upsample:
        raw = upsample_to(raw, size, options.interpolation)
        if options.relu and options.interpolation not in ("nearest", "bilinear", "linear"):
            raw = jax.nn.relu(raw)
    if options.normalize:
        raw = normalize_maps(raw)
    return raw


def maps_from_grads(out: Grads, method_fn: Callable, options: MapOptions, size: tuple[int, int] | None):
    """One method's finished maps from one forward's :class:`Grads`: ``(B, H, W)`` or ``(B, K, H, W)``.

    ``method_fn(A, dA) -> (B, h, w)`` is a raw-map formula of :mod:`gradcam_jax.methods`.
    """
    a = to_grid(out.activation, options.drop_tokens, options.grid).astype(jnp.float32)
    if options.normalize and a.shape[1:3] == (1, 1):
        raise ValueError(
            f"The tapped layer's output {out.activation.shape} has no spatial extent: its map is one "
            f"number per example, which normalisation would turn into 0. Pass normalize=False and "
            f"upsample=False for that number, or tap a layer with spatial axes."
        )
    g = out.grads.astype(jnp.float32)
    if options.counterfactual:
        g = -g

    def raw_map(gk):
        return method_fn(a, to_grid(gk, options.drop_tokens, options.grid))

    if out.selected.ndim == 1:
        return finish_maps(raw_map(g), options, size)
    return finish_maps(jnp.swapaxes(jax.vmap(raw_map)(g), 0, 1), options, size)  # (B, K, h, w)


def check_image_batch(x, who: str) -> None:
    """Raise unless ``x`` is a floating channels-last image batch ``(B, H, W, C)``."""
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{who}: images must be a channels-last batch (B, H, W, C); got {shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{who}: images must be floating (the model's input); got dtype {x.dtype}. "
            f"Convert them with x.astype(jnp.float32) (or the model's preprocess)."
        )


def map_size(x, options: MapOptions) -> tuple[int, int] | None:
    """The ``(H, W)`` maps are upsampled to: the input's, or ``None`` without upsampling."""
    if not options.upsample:
        return None
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"upsample=True resizes maps to the input image, which must be (B, H, W, C); the input "
            f"is {shape}. Pass upsample=False for maps at the layer's resolution."
        )
    return tuple(x.shape[1:3])
