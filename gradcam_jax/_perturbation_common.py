"""What the perturbation CAMs share: their options, reduced-precision forwards, the weighted
channel sum, the input checks and the choice of the chunk loop (:mod:`gradcam_jax.perturbation`,
:mod:`gradcam_jax.score_variants`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ._chunking import Stages, host_chunks, perturbations_per_step, run_on_host
from ._grads import check_tap_target
from ._maps import MapOptions, check_cam_input, check_images
from ._smoothing import augmented_maps, check_aug_smooth
from ._tap import Tap, as_tap
from ._targets import batch_size, target_spec
from .methods import first_component

__all__ = [
    "PerturbationOptions",
    "check_dtype",
    "cast_floating",
    "in_dtype",
    "weighted_channels",
    "prepare_perturbation",
    "perturbation_options",
    "run_perturbation",
    "smoothed",
]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class PerturbationOptions:
    """The static options of a perturbation CAM kernel."""

    maps: MapOptions
    per_step: int
    compute_dtype: Any = None
    top_n: int | None = None
    aug: bool = False
    eigen: bool = False
    variant: Any = None  # SS-CAM's / IS-CAM's masks (gradcam_jax.score_variants); None: Score-CAM


def check_dtype(compute_dtype):
    if compute_dtype is None:
        return None
    dt = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"compute_dtype must be a floating dtype such as jnp.bfloat16; got {dt}.")
    return dt


def cast_floating(tree, dtype):
    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf).astype(dtype)
        return leaf

    return tree if dtype is None else jax.tree_util.tree_map(cast, tree)


def in_dtype(tap: Tap, compute_dtype) -> Tap:
    """The same split with the floating parameters cast to ``compute_dtype``.

    Weights captured in closures (``split_tap``) are not parameters and keep their dtype; the
    computation then promotes to the wider dtype.
    """
    return tap if compute_dtype is None else tap.with_params(cast_floating(tap.params, compute_dtype))


def weighted_channels(weights, a, eigen: bool = False):
    """``sum_k w_k A^k``: weights ``(N, B)`` or ``(N, B, K)``, ``a`` ``(B, *spatial, N)``.

    ``eigen``: the first principal component of the terms ``w_k A^k`` instead of their sum
    (``eigen_smooth``; :func:`gradcam_jax.methods.first_component`).
    """
    if eigen:
        w = jnp.moveaxis(weights, 0, -1)  # (B, N) or (B, K, N)
        if w.ndim == 2:
            return first_component(w.reshape((w.shape[0],) + (1,) * (a.ndim - 2) + w.shape[-1:]) * a)
        terms = w.reshape(w.shape[:2] + (1,) * (a.ndim - 2) + w.shape[-1:]) * a[:, None]
        return jax.vmap(first_component, in_axes=1, out_axes=1)(terms)
    if weights.ndim == 2:
        return jnp.einsum("nb,b...n->b...", weights, a, precision=_HIGHEST)
    return jnp.einsum("nbk,b...n->bk...", weights, a, precision=_HIGHEST)


def prepare_perturbation(tap, x, target, who: str, maps: MapOptions, *, images: bool, aug: bool = False):
    """The checks every perturbation CAM makes in Python, before anything is compiled."""
    tap = as_tap(tap)
    if images:
        check_images(x, maps, who)  # the input gate; Score-CAM masks the image
    check_cam_input(x, maps, who)
    if aug:
        check_aug_smooth(x, maps, who)
    batch = batch_size(x)
    spec = target_spec(target, batch)
    check_tap_target(tap, x, spec, who)
    return tap, batch, spec


def perturbation_options(
    maps: MapOptions, chunk_size, batch: int, compute_dtype, top_n=None, aug=False, eigen=False, variant=None
) -> PerturbationOptions:
    per_step = perturbations_per_step(chunk_size, batch)
    dtype = check_dtype(compute_dtype)
    return PerturbationOptions(maps, per_step, dtype, top_n, bool(aug), bool(eigen), variant)


def run_perturbation(kernel, stages: Stages, args: tuple, options: PerturbationOptions, chunk_loop, who: str):
    """``kernel(*args, options=options)``, or its chunks from Python with ``chunk_loop="host"``
    (:func:`run_chunked`; these stages have ``auto_host=False``). ``aug_smooth`` ``vmap``-s the
    whole computation over augmented copies, so its chunks always loop on the device."""
    host = host_chunks(chunk_loop, args, 2, who, stages.auto_host)
    if options.aug and host:
        raise ValueError(
            f"{who}: chunk_loop='host' does not combine with aug_smooth=True (the augmented copies are "
            f"vmap-ed around the whole computation, so its chunks loop on the device); pass 'auto'."
        )
    return run_on_host(stages, args, options, options.per_step) if host else kernel(*args, options=options)


def smoothed(body, tap: Tap, x, target, options, who: str):
    """``body(tap, x, target, options)`` (finished maps), averaged over augmented copies of ``x`` when
    ``options.aug`` (``aug_smooth``; the copies run as one ``vmap``-ed batch)."""
    if not options.aug:
        return body(tap, x, target, options)
    maps, _ = augmented_maps(lambda xa: (body(tap, xa, target, options), None), x, options.maps, who)
    return maps
