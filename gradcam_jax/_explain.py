"""The explainers users call: :func:`grad_cam` and :func:`cam`.

Each is a thin wrapper that checks the arguments in Python (so bad input fails before any
compilation, with a message that says how to fix it) and then calls one jit-compiled function
with the tap as a pytree argument: parameters are traced, not baked in as constants, and the
compiled kernel is reused across calls with the same shapes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from . import methods as _methods
from ._core import (
    Target,
    TargetSpec,
    _activations_and_grads,
    _batch_size,
    _run_tap,
    check_target_against,
    jit_target_fn,
    jit_target_value,
    spec_from_jit,
    target_spec,
)
from ._tap import Tap, as_tap
from .postprocess import INTERPOLATIONS, normalize_maps, upsample_to

__all__ = ["grad_cam", "cam", "to_grid", "finish_maps", "maps_from_grads", "PERTURBATION_METHODS"]

#: Methods computed from forward passes on perturbed inputs rather than from (A, dA).
PERTURBATION_METHODS = ("score_cam", "ablation_cam")


def to_grid(a, drop_tokens: int = 0, grid: Optional[Tuple[int, int]] = None):
    """Bring an activation (or gradient) to ``(B, h, w, C)``.

    ``(B, h, w, C)`` is kept; ``(B, C)`` becomes ``(B, 1, 1, C)`` (no spatial axes: a method's
    weights are then ``dA`` itself); tokens ``(B, N, C)`` lose ``drop_tokens`` leading tokens
    (a class token, register tokens) and are reshaped to ``grid = (h, w)``, by default the
    square ``sqrt(N - drop_tokens)``.
    """
    if a.ndim == 4:
        if drop_tokens or grid is not None:
            raise ValueError("drop_tokens and grid apply to token activations (B, N, C); this layer's output is (B, h, w, C).")
        return a
    if a.ndim == 2:
        return a[:, None, None, :]
    if a.ndim == 3:
        tokens = a[:, drop_tokens:, :]
        n = tokens.shape[1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(
                    f"The tapped layer outputs {a.shape[1]} tokens; after dropping {drop_tokens}, {n} "
                    f"do not form a square grid. Pass drop_tokens= (e.g. 1 for a class token) and/or "
                    f"grid=(h, w)."
                )
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise ValueError(f"grid={tuple(grid)} holds {grid[0] * grid[1]} tokens, but {n} remain after dropping {drop_tokens}.")
        return tokens.reshape(a.shape[0], grid[0], grid[1], a.shape[-1])
    raise ValueError(
        f"The tapped layer's output has shape {a.shape}; supported are (B, h, w, C), tokens (B, N, C) "
        f"and (B, C). Tap another layer, or reshape in a split_tap."
    )


def finish_maps(raw, *, size, relu: bool, upsample: bool, normalize: bool, interpolation: str):
    """ReLU, upsample to ``size``, normalise — in that order (the paper's convention).

    After a ReLU, the overshoot of bicubic/Lanczos kernels is clipped so that zero evidence
    stays zero.
    """
    raw = raw.astype(jnp.float32)
    if relu:
        raw = jax.nn.relu(raw)
    if upsample:
        raw = upsample_to(raw, size, interpolation)
        if relu and interpolation not in ("nearest", "bilinear", "linear"):
            raw = jax.nn.relu(raw)
    if normalize:
        raw = normalize_maps(raw)
    return raw


def _resolve_method(method) -> Callable:
    if isinstance(method, str):
        return _methods.get(method)
    if callable(method):
        return method
    raise TypeError(f"method must be a registered name or a function (A, dA) -> map; got {method!r}.")


def check_image_batch(x, who: str):
    """Raise unless ``x`` is a floating channels-last image batch ``(B, H, W, C)``."""
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{who}: images must be a channels-last batch (B, H, W, C); got {shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: images must be floating (the model's input); got dtype {x.dtype}. "
                        f"Convert them with x.astype(jnp.float32) (or the model's preprocess).")


def _image_size(x, upsample: bool):
    if not upsample:
        return None
    if not hasattr(x, "ndim") or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"upsample=True resizes maps to the input image, which must be (B, H, W, C); the input "
            f"is {shape}. Pass upsample=False for maps at the layer's resolution."
        )
    return tuple(x.shape[1:3])


def _check_range_eagerly(tap: Tap, x, spec: TargetSpec) -> None:
    check_target_against(spec, lambda: _run_tap.eval_shape(tap, x)[0])


def _check_common(x, interpolation: str):
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.")
    return _batch_size(x)


@functools.partial(
    jax.jit,
    static_argnames=("kind", "target_fn", "method_fn", "size", "relu", "upsample", "normalize",
                     "interpolation", "counterfactual", "drop_tokens", "grid"),
)
def _cam_jit(tap, x, target_value, *, kind, target_fn, method_fn, size, relu, upsample, normalize,
             interpolation, counterfactual, drop_tokens, grid):
    spec = spec_from_jit(kind, target_value, target_fn)
    out = _activations_and_grads(tap, x, spec)
    if normalize and to_grid(out.activation, drop_tokens, grid).shape[1:3] == (1, 1):
        raise ValueError(
            f"The tapped layer's output {out.activation.shape} has no spatial extent: its map is one "
            f"number per example, which normalisation would turn into 0. Pass normalize=False and "
            f"upsample=False for that number, or tap a layer with spatial axes."
        )
    finish = functools.partial(finish_maps, size=size, relu=relu, upsample=upsample,
                               normalize=normalize, interpolation=interpolation)
    return maps_from_grads(out, method_fn, finish, counterfactual=counterfactual,
                           drop_tokens=drop_tokens, grid=grid)


def maps_from_grads(out, method_fn, finish, *, counterfactual: bool, drop_tokens: int, grid):
    """One method's finished maps from one forward's ``Grads``: ``(B, H, W)`` or ``(B, K, H, W)``.

    ``finish`` maps raw ``(..., h, w)`` maps to finished ones (:func:`finish_maps` with options).
    """
    a = to_grid(out.activation, drop_tokens, grid).astype(jnp.float32)
    g = out.grads.astype(jnp.float32)
    if counterfactual:
        g = -g
    if out.selected.ndim == 1:
        return finish(method_fn(a, to_grid(g, drop_tokens, grid)))
    raw = jax.vmap(lambda gk: method_fn(a, to_grid(gk, drop_tokens, grid)))(g)  # (K, B, h, w)
    return finish(jnp.swapaxes(raw, 0, 1))


def cam(tap, x, target: Target = None, method: Union[str, Callable] = "grad_cam", *,
        upsample: bool = True, normalize: bool = True, relu: bool = True,
        interpolation: str = "bilinear", counterfactual: bool = False, drop_tokens: int = 0,
        grid: Optional[Tuple[int, int]] = None, **method_options) -> jax.Array:
    """Class activation maps by any registered method.

    Gradient methods cost one forward pass and a backward pass to the layer per batch; the
    perturbation methods ``"score_cam"`` and ``"ablation_cam"`` run batched, chunked forwards
    (see :mod:`gradcam_jax.perturbation`; their options ``chunk_size``, ``top_n``,
    ``compute_dtype`` pass through ``**method_options``).

    Args:
      tap: the model split at a layer (:func:`~gradcam_jax.linen_tap`, ...).
      x: the input batch, ``(B, H, W, C)`` images (any batched input with ``upsample=False``).
      target: what to explain. ``None``: each example's top class; an int: that class for every
        example; an int array ``(B,)``: one class per example; a list of K ints or an int array
        ``(B, K)``: K maps per example (still one forward pass); a callable
        ``scores -> (B,)`` (or ``(B, K)``) for any other differentiable output; bind arrays it
        needs (a mask, a box) with ``functools.partial`` so new values do not recompile.
      method: a name in :data:`gradcam_jax.methods.REGISTRY` (``"grad_cam"``, ``"cam"``,
        ``"grad_cam_plus_plus"``, ``"xgrad_cam"``, ``"hires_cam"``, ``"layer_cam"``,
        ``"eigen_cam"``, ``"eigen_grad_cam"``), ``"score_cam"``, ``"ablation_cam"``, or a
        function ``(A, dA) -> (B, h, w)``.
      upsample: resize maps to the input's ``(H, W)``; otherwise they stay at the layer's.
      normalize: min-max normalise each map to [0, 1] (after upsampling). All-zero maps stay 0.
      relu: apply the final ReLU (the paper's; keeps only evidence for the class).
      interpolation: ``"bilinear"`` (the paper's), ``"nearest"`` (Captum's default; equal to
        torch's for integer scale factors, as from a CNN's layer to its input), ``"bicubic"``...
      counterfactual: negate the gradients: regions whose removal would raise the score
        (Selvaraju et al. §3.3).
      drop_tokens: for token activations ``(B, N, C)``: leading tokens to drop (1 for a class
        token).
      grid: for token activations: ``(h, w)`` of the token grid (default: square).
      **method_options: options of the perturbation methods (``chunk_size``, ``top_n``,
        ``compute_dtype``).

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jnp.tanh(x), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> gcj.cam(tap, jnp.ones((2, 8, 8, 3)), target=[0, 4], method="grad_cam_plus_plus").shape
      (2, 2, 8, 8)
    """
    if isinstance(method, str) and method in PERTURBATION_METHODS:
        if counterfactual:
            raise ValueError(f"counterfactual=True negates gradients; method={method!r} uses none.")
        from . import perturbation  # imported here: perturbation builds on this module

        return getattr(perturbation, method)(
            tap, x, target, upsample=upsample, normalize=normalize, relu=relu,
            interpolation=interpolation, drop_tokens=drop_tokens, grid=grid, **method_options)
    if method_options:
        raise TypeError(
            f"cam got options {sorted(method_options)} that only the perturbation methods "
            f"({', '.join(PERTURBATION_METHODS)}) take; method={method!r} does not.")
    tap = as_tap(tap)
    batch = _check_common(x, interpolation)
    method_fn = _resolve_method(method)
    size = _image_size(x, upsample)
    spec = target_spec(target, batch)
    _check_range_eagerly(tap, x, spec)
    grid = None if grid is None else tuple(int(v) for v in grid)
    return _cam_jit(
        tap, x, jit_target_value(spec),
        kind=spec.kind, target_fn=jit_target_fn(spec), method_fn=method_fn,
        size=size, relu=bool(relu), upsample=bool(upsample), normalize=bool(normalize),
        interpolation=interpolation, counterfactual=bool(counterfactual),
        drop_tokens=int(drop_tokens), grid=grid,
    )


def grad_cam(tap, x, target: Target = None, *, upsample: bool = True, normalize: bool = True,
             relu: bool = True, interpolation: str = "bilinear", counterfactual: bool = False,
             drop_tokens: int = 0, grid: Optional[Tuple[int, int]] = None) -> jax.Array:
    """Grad-CAM maps: ``ReLU(sum_k w_k A^k)`` with ``w_k`` the spatial mean of ``d y^c / d A^k``.

    One forward pass and one backward pass down to the tapped layer per batch, whatever the
    number of classes. ``upsample=False, normalize=False, relu=False`` gives the raw map
    ``sum_k w_k A^k`` at the layer's resolution (what Captum's ``LayerGradCam`` returns).
    Arguments as in :func:`cam`.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jax.nn.relu(x), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
      >>> maps = gcj.grad_cam(tap, x)            # each example's top class
      >>> maps.shape, bool(maps.min() >= 0), bool(maps.max() <= 1)
      ((2, 8, 8), True, True)

    References:
      Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
      Localization", ICCV 2017, https://arxiv.org/abs/1610.02391.
    """
    return cam(tap, x, target, "grad_cam", upsample=upsample, normalize=normalize, relu=relu,
               interpolation=interpolation, counterfactual=counterfactual,
               drop_tokens=drop_tokens, grid=grid)
