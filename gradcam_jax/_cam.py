"""The CAM explainers users call — :func:`grad_cam` and :func:`cam` — and the one method table.

Each explainer checks its arguments in Python (so bad input fails before any compilation, with
a message that says how to fix it) and then calls one jit-compiled kernel with the tap as a
pytree argument: parameters are traced, not baked in as constants, and the compiled kernel is
reused across calls with the same shapes.

:data:`METHODS` maps every method name to its kind and function: a *gradient* method is a
raw-map formula ``(A, dA) -> (B, h, w)`` from :mod:`gradcam_jax.methods` (one forward pass
for any number of classes); a *perturbation* method is an explainer of
:mod:`gradcam_jax.perturbation` with :func:`cam`'s signature.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import cams, fullgrad, methods, perturbation, score_variants
from ._callables import StableFunction
from ._grads import check_dead, check_tap_target, grads_for_spec, zero_gradients
from ._maps import MapOptions, check_cam_input, kernel, map_geometry, maps_from_grads
from ._smoothing import augmented_maps, check_aug_smooth, check_fuse, fuse_maps
from ._tap import Tap, as_tap
from ._targets import Target, TargetSpec, batch_size, target_spec

__all__ = [
    "Method",
    "METHODS",
    "cam",
    "grad_cam",
    "register_method",
    "method_names",
    "canonical_method_name",
    "gradient_method",
]

GRADIENT, PERTURBATION, EXPLAINER = "gradient", "perturbation", "explainer"


@dataclasses.dataclass(frozen=True)
class Method:
    """An entry of :data:`METHODS`: ``kind`` is ``"gradient"``, ``"perturbation"`` or ``"explainer"``.

    A gradient method is a raw-map formula ``(A, dA) -> (B, h, w)`` (every one shares one
    forward pass, in :func:`cam` and in the dataset runner); a perturbation method or an
    explainer is a function with :func:`cam`'s keyword signature (an explainer is a gradient
    method that needs more than ``(A, dA)``: a Hessian-vector product, other classes' scores,
    a random key).

    ``uses_grads``: a gradient method whose formula reads ``dA`` (Eigen-CAM does not); for
    those an all-zero ``dA`` is refused as the silent failure it is.
    """

    kind: str
    fn: Callable
    uses_grads: bool = True


#: Every CAM method by name. A gradient method's ``fn`` is ``(A, dA) -> (B, h, w)``; a
#: perturbation method's is an explainer ``(tap, x, target, **options) -> maps``.
METHODS: dict[str, Method] = {
    "grad_cam": Method(GRADIENT, methods.grad_cam),
    "cam": Method(GRADIENT, methods.gradient_sum),
    "gradient_sum": Method(GRADIENT, methods.gradient_sum),
    "grad_cam_plus_plus": Method(GRADIENT, methods.grad_cam_plus_plus),
    "gradcam++": Method(GRADIENT, methods.grad_cam_plus_plus),
    "xgrad_cam": Method(GRADIENT, methods.xgrad_cam),
    "hires_cam": Method(GRADIENT, methods.hires_cam),
    "layer_cam": Method(GRADIENT, methods.layer_cam),
    "eigen_cam": Method(GRADIENT, methods.eigen_cam, uses_grads=False),
    "eigen_grad_cam": Method(GRADIENT, methods.eigen_grad_cam),
    "grad_cam_elementwise": Method(GRADIENT, methods.grad_cam_elementwise),
    "kpca_cam": Method(GRADIENT, methods.kpca_cam, uses_grads=False),
    "score_cam": Method(PERTURBATION, perturbation.score_cam),
    "ablation_cam": Method(PERTURBATION, perturbation.ablation_cam),
    "ss_cam": Method(PERTURBATION, score_variants.ss_cam),
    "is_cam": Method(PERTURBATION, score_variants.is_cam),
    "shapley_cam": Method(EXPLAINER, cams.shapley_cam),
    "finer_cam": Method(EXPLAINER, cams.finer_cam),
    "random_cam": Method(EXPLAINER, cams.random_cam),
    "fullgrad": Method(EXPLAINER, fullgrad.fullgrad),
}


def canonical_method_name(name: str) -> str:
    """The table's spelling of a method name: ``"Grad-CAM"`` -> ``"grad_cam"``."""
    return name.strip().lower().replace("-", "_")


def method_names(kind: str | None = None) -> tuple[str, ...]:
    """The registered method names, sorted (of one ``kind``: ``"gradient"``, ``"perturbation"``,
    ``"explainer"``)."""
    return tuple(sorted(n for n, m in METHODS.items() if kind is None or m.kind == kind))


def register_method(name: str, fn: Callable) -> None:
    """Add a gradient method ``fn(A, dA) -> (B, h, w)`` under ``name`` for :func:`cam`.

    Examples:
      >>> import jax.numpy as jnp, gradcam_jax as gcj
      >>> def abs_grad_cam(a, g):  # weights: the spatial mean of |dA|
      ...     return jnp.einsum("bc,bhwc->bhw", jnp.abs(g).mean((1, 2)), a)
      >>> gcj.register_method("abs_grad_cam", abs_grad_cam)
      >>> "abs_grad_cam" in gcj.method_names("gradient")
      True
      >>> del gcj.METHODS["abs_grad_cam"]
    """
    if not callable(fn):
        raise TypeError(f"register_method: {name!r} needs a callable fn(A, dA) -> map.")
    METHODS[canonical_method_name(name)] = Method(GRADIENT, fn)


def resolve_method(method: str | Callable) -> Method:
    """The :class:`Method` for a name or a raw-map function; the error lists the known names."""
    if isinstance(method, str):
        try:
            return METHODS[canonical_method_name(method)]
        except KeyError:
            raise ValueError(
                f"Unknown CAM method {method!r}. Known methods: {', '.join(method_names())}."
            ) from None
    if callable(method):
        # Keyed by code and closure: a fresh lambda with the same code reuses the compiled kernel.
        return Method(GRADIENT, StableFunction(method) if inspect.isfunction(method) else method)
    raise TypeError(f"method must be a registered name or a function (A, dA) -> map; got {method!r}.")


def gradient_method(name: str | Callable) -> Callable:
    """The raw-map formula ``(A, dA) -> (B, h, w)`` of a gradient method (by name, or itself)."""
    entry = resolve_method(name)
    if entry.kind != GRADIENT:
        raise ValueError(
            f"{name!r} is a perturbation method; only gradient methods ({', '.join(method_names(GRADIENT))}) "
            f"share one forward pass."
        )
    return entry.fn


@dataclasses.dataclass(frozen=True)
class GradientCamOptions:
    """The static options of :func:`gradient_cam_kernel`: the raw-map formula, map options and
    whether to average over test-time augmentations (``aug``)."""

    method: Callable
    maps: MapOptions
    aug: bool = False
    fuse: str | None = None


def gradient_maps(tap: Tap, x, target: TargetSpec, options: GradientCamOptions):
    """One forward pass, one (vmapped) pullback, one formula: ``(maps, dead)`` (see the kernel).

    With ``options.fuse`` (a multi-layer tap) every layer's map is finished and normalised at the
    input's size, and the maps are fused (:func:`~gradcam_jax._smoothing.fuse_maps`).
    """
    out = grads_for_spec(tap, x, target)
    size, rank = map_geometry(x, options.maps, "cam")
    if options.fuse is None:
        maps = maps_from_grads(out, options.method, options.maps, size, rank)
    else:
        each = dataclasses.replace(options.maps, normalize=True)
        layer_maps = [maps_from_grads(g, options.method, each, size, rank) for g in out.per_layer().values()]
        maps = fuse_maps(layer_maps, options.fuse, options.maps.normalize, rank or 2)
    return maps, zero_gradients(out, options.maps.drop_tokens)


@kernel
def gradient_cam_kernel(tap: Tap, x, target: TargetSpec, *, options: GradientCamOptions):
    """A gradient method's maps under ``jit``: one forward pass, one (vmapped) pullback.

    Returns ``(maps, dead)``: ``dead`` is ``(B,)`` (or ``(B, K)``), true where ``dA`` is zero at
    every position of the layer — the explained score does not depend on it there. With
    ``options.aug`` the augmented copies run as one ``vmap``-ed batch (see :mod:`._smoothing`).
    """
    if not options.aug:
        return gradient_maps(tap, x, target, options)
    maps, dead = augmented_maps(lambda xa: gradient_maps(tap, xa, target, options), x, options.maps, "cam")
    return maps, jnp.any(dead, axis=0)


def cam(
    tap,
    x,
    target: Target = None,
    method: str | Callable = "grad_cam",
    *,
    upsample: bool = True,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    counterfactual: bool = False,
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    fuse: str | None = None,
    **method_options,
) -> jax.Array:
    """Class activation maps by any registered method.

    Gradient methods cost one forward pass and a backward pass to the layer per batch; the
    perturbation methods ``"score_cam"`` and ``"ablation_cam"`` run batched, chunked forwards
    (see :mod:`gradcam_jax.perturbation`; their options ``chunk_size``, ``top_n``,
    ``compute_dtype`` pass through ``**method_options``).

    Args:
      tap: the model split at a layer (:func:`~gradcam_jax.linen_tap`, ...).
      x: the input batch: images ``(B, H, W, C)``, signals ``(B, T, C)``, volumes or videos
        ``(B, D, H, W, C)`` (channels-first with ``layout=``), or a pytree of arrays (a dict,
        a tuple for a multi-input model) whose image ``input=`` picks; any batched input with
        ``upsample=False``.
      target: what to explain. ``None``: each example's top class; an int: that class for every
        example; an int array ``(B,)``: one class per example; a list of K ints or an int array
        ``(B, K)``: K maps per example (still one forward pass); a callable
        ``scores -> (B,)`` (or ``(B, K)``) for any other differentiable output; bind arrays it
        needs (a mask, a box) with ``functools.partial`` so new values do not recompile.
      method: a name in :data:`gradcam_jax.METHODS` (``"grad_cam"``, ``"cam"``,
        ``"grad_cam_plus_plus"``, ``"xgrad_cam"``, ``"hires_cam"``, ``"layer_cam"``,
        ``"grad_cam_elementwise"``, ``"eigen_cam"``, ``"eigen_grad_cam"``, ``"kpca_cam"``),
        the perturbation methods ``"score_cam"``, ``"ablation_cam"``, ``"ss_cam"``,
        ``"is_cam"``, the explainers ``"shapley_cam"``, ``"finer_cam"``, ``"random_cam"`` (see
        :mod:`gradcam_jax.cams`), ``"fullgrad"`` (:mod:`gradcam_jax.fullgrad`), or a function
        ``(A, dA) -> (B, h, w)``.
      upsample: resize maps to the input's ``(H, W)``; otherwise they stay at the layer's.
      normalize: min-max normalise each map to [0, 1] (after upsampling). All-zero maps stay 0.
      relu: apply the final ReLU (the paper's; keeps only evidence for the class).
      interpolation: ``"bilinear"`` (the paper's), ``"nearest"`` (Captum's default; equal to
        torch's for integer scale factors, as from a CNN's layer to its input), ``"bicubic"``...
      counterfactual: negate the gradients: regions whose removal would raise the score
        (Selvaraju et al. §3.3).
      drop_tokens: for token activations ``(B, N, C)``: leading tokens to drop (1 for a class
        token).
      grid: for token activations: ``(h, w)`` of the token grid (default: square; ``(d, h, w)``
        for volumes).
      layout: the image's layout: ``"NHWC"`` (default for 4-D), ``"NCHW"``, ``"NLC"`` / ``"NCL"``
        (1-D), ``"NDHWC"`` / ``"NCDHW"`` (3-D). An input that looks channels-first is refused
        without it rather than guessed. With ``upsample=False`` and no ``layout``, a 3-D input
        ``(B, N, C)`` is taken as tokens (a square grid, as for a ViT); ``layout="NLC"`` makes
        it a 1-D signal.
      input: for a pytree input, the image: a key, an index, or a callable picking it (default:
        the only floating array of rank >= 3). Other leaves pass through unchanged.
      aug_smooth: test-time augmentation: the mean of the maps of the image, its mirror image
        and both scaled by 0.9 and 1.1 (each map mapped back; pytorch-grad-cam's ``aug_smooth``),
        the six copies run as one vmapped batch: six times one map's cost. Images only.
      eigen_smooth: the first principal component of the per-channel terms ``w_k A^k`` instead
        of their sum (pytorch-grad-cam's ``eigen_smooth``); Eigen-CAM, Eigen-Grad-CAM and
        KPCA-CAM are projections already and are unchanged.
      fuse: with a multi-layer tap (``layers=[...]``), how the layers' maps are combined:
        ``"mean"`` (pytorch-grad-cam's), ``"max"`` or ``"layer_cam"`` (LayerCAM's ``tanh(2 M)``
        scaling, then the maximum; Jiang et al. 2021, eq. 9). Each layer's map is finished and
        normalised at the input's size first; one forward pass gives every layer's ``A`` and
        ``dA``. Gradient methods only.
      **method_options: options of the perturbation methods (``chunk_size``, ``top_n``,
        ``compute_dtype``, ``n_noise``, ``noise_std``, ``steps``) and of the explainers
        (``key`` for ``"random_cam"``; ``alpha``, ``comparisons``, ``base_method`` for
        ``"finer_cam"``; ``biases`` for ``"fullgrad"``, whose tap has several layers).

    Returns:
      ``float32`` maps ``(B, *spatial)`` (``(B, H, W)`` for images), or ``(B, K, *spatial)``
      for K targets per example.

      NaN is never laundered: the map of an example (or example-target) whose explained score
      is NaN, or whose raw map holds a NaN, is all NaN — normalised or not, in every method.
      Under an outer ``jax.jit`` a traced ``target`` cannot be range-checked: an out-of-range
      class (``99`` for 10 classes, or ``-5``) gets a NaN score and so a NaN map (never
      another class's map, never zeros). Concrete targets are checked before anything runs.

    Raises:
      ValueError: the gradient at the tapped layer is exactly zero for an example (the score
        does not depend on the layer there: the map would be silently empty); the message
        names the likely cause. Under an outer ``jax.jit`` this cannot be checked: the
        all-zero maps are returned. Also: an empty batch (``B = 0``: every explainer and
        metric refuses it), a target out of range (checked on its exact value, before any
        cast: ``2**32 + 3`` is not 3), a callable target whose result is not ``(B,)`` or
        ``(B, K)``.
      TypeError: ``x`` (its image) is not floating — ``uint8`` pixels are refused with the
        fix, ``x.astype(jnp.float32)`` or the model's preprocess; a callable target returns
        integers (class indices are not scores).

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jnp.tanh(x), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> gcj.cam(tap, jnp.ones((2, 8, 8, 3)), target=[0, 4], method="grad_cam_plus_plus").shape
      (2, 2, 8, 8)
    """
    # long-function: the docstring documents every option; the body is short.
    entry = resolve_method(method)
    maps = MapOptions(
        upsample, normalize, relu, interpolation, counterfactual, drop_tokens, grid, layout, input
    )
    if entry.kind != GRADIENT:
        if fuse is not None:
            raise ValueError(
                f"fuse={fuse!r} combines the layers of a multi-layer tap for the gradient methods "
                f"({', '.join(method_names(GRADIENT))}); method={method!r} explains one layer."
            )
        if entry.kind == PERTURBATION:
            if counterfactual:
                raise ValueError(f"counterfactual=True negates gradients; method={method!r} uses none.")
        else:
            method_options["counterfactual"] = counterfactual
        return entry.fn(
            tap,
            x,
            target,
            aug_smooth=aug_smooth,
            eigen_smooth=eigen_smooth,
            upsample=upsample,
            normalize=normalize,
            relu=relu,
            interpolation=interpolation,
            drop_tokens=drop_tokens,
            grid=grid,
            layout=layout,
            input=input,
            **method_options,
        )
    if method_options:
        raise TypeError(
            f"cam got options {sorted(method_options)} that only the perturbation methods "
            f"({', '.join(method_names(PERTURBATION))}) and explainers "
            f"({', '.join(method_names(EXPLAINER))}) take; method={method!r} does not."
        )
    tap = as_tap(tap)
    who = method if isinstance(method, str) else "cam"
    check_cam_input(x, maps, who)  # the input gate: a clear error now, before any tracing
    if aug_smooth:
        check_aug_smooth(x, maps, who)
    if fuse is not None:
        check_fuse(fuse, maps, who)
    formula = methods.eigen_smoothed(entry.fn) if eigen_smooth else entry.fn
    spec = target_spec(target, batch_size(x))
    check_tap_target(tap, x, spec, who, several=fuse is not None)
    options = GradientCamOptions(formula, maps, bool(aug_smooth), fuse)
    out, dead = gradient_cam_kernel(tap, x, spec, options=options)
    if entry.uses_grads:
        check_dead(dead, who)
    return out


def grad_cam(
    tap,
    x,
    target: Target = None,
    *,
    upsample: bool = True,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    counterfactual: bool = False,
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
) -> jax.Array:
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
    return cam(
        tap,
        x,
        target,
        "grad_cam",
        upsample=upsample,
        normalize=normalize,
        relu=relu,
        interpolation=interpolation,
        counterfactual=counterfactual,
        drop_tokens=drop_tokens,
        grid=grid,
        layout=layout,
        input=input,
        aug_smooth=aug_smooth,
        eigen_smooth=eigen_smooth,
    )
