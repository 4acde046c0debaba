"""Gradient CAMs that need more than ``(A, dA)``: ShapleyCAM, Finer-CAM and the RandomCAM baseline.

- :func:`shapley_cam` adds the second-order term of the score's Taylor expansion: a
  Hessian-vector product, ``jax.linearize`` of the pullback (forward-over-reverse), in the same
  forward pass.
- :func:`finer_cam` explains the class against the classes whose scores are closest to it
  (one forward pass: the comparison classes are picked from the same scores).
- :func:`random_cam` weights the channels with uniform noise: a baseline for the metrics.

Each is a thin wrapper that checks its arguments and calls one jitted kernel; all take
:func:`gradcam_jax.cam`'s options, ``aug_smooth`` and ``eigen_smooth`` included, and are
registered in :data:`gradcam_jax.METHODS` (``gcj.cam(tap, x, method="shapley_cam")``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import methods
from ._grads import Grads, check_dead, check_tap_target, grads_for_spec, tap_shapes, zero_gradients
from ._maps import MapOptions, check_cam_input, kernel, map_geometry, maps_from_grads
from ._smoothing import augmented_maps, check_aug_smooth
from ._tap import Tap, as_tap
from ._targets import Target, TargetSpec, batch_size, fixed_top, pull_back, select_scores, target_spec

__all__ = ["shapley_cam", "finer_cam", "random_cam", "finer_scores"]


@dataclasses.dataclass(frozen=True)
class ExplainerOptions:
    """The static options of :func:`explainer_kernel`."""

    kind: str  # "shapley" | "finer" | "random"
    formula: Callable
    maps: MapOptions
    aug: bool = False
    alpha: float = 1.0
    comparisons: tuple[int, ...] = (1, 2, 3)


def shapley_grads(tap: Tap, x, spec: TargetSpec) -> Grads:
    """``Grads`` whose ``grads`` are ``dA - 0.5 H A`` (H: the Hessian of the score in ``A``).

    ``jax.linearize`` of ``delta -> dA(delta)`` (the pullback at ``A + delta``) evaluates the
    forward pass and the backward pass once and returns the linear map ``v -> H v``; applied to
    ``v = A`` it is the Hessian-vector product. The K targets of a ``(B, K)`` target are K
    pullbacks (``vmap``), so K Hessian-vector products, still one forward pass.
    """
    _, act_spec = tap_shapes(tap, x)
    delta0 = jnp.zeros(act_spec.shape, act_spec.dtype)

    def objective(delta):
        scores, a = tap(x, delta)
        return select_scores(spec, scores), (scores, a)

    def first_order(delta):
        selected, pullback, aux = jax.vjp(objective, delta, has_aux=True)
        (g,) = pull_back(pullback, selected)
        return g, (selected, aux)

    g, hvp_of, (selected, (scores, a)) = jax.linearize(first_order, delta0, has_aux=True)
    hvp = hvp_of(a.astype(delta0.dtype))
    first = Grads(scores, a, g, selected)
    return first._replace(grads=g - 0.5 * hvp)


def finer_scores(scores, main, alpha: float = 1.0, comparisons: tuple[int, ...] = (1, 2, 3)):
    """Finer-CAM's score: the class against the classes whose scores are nearest to it.

    With ``y`` the scores, ``c`` the class (``main``: ``(B,)`` or ``(B, K)`` indices) and ``J``
    the classes ranked ``comparisons`` (1 = nearest) by ``|y_j - y_c|`` (``c`` itself excluded)::

        s = sum_{j in J} p_j (y_c - alpha y_j) / (sum_{j in J} p_j + 1e-9),   p = softmax(y)

    differentiated through ``p`` too — pytorch-grad-cam's ``FinerWeightedTarget``. Which classes
    are nearest is read from the scores without gradient.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.cams import finer_scores
      >>> y = jnp.array([[3.0, 2.0, 0.0, -1.0]])
      >>> round(float(finer_scores(y, jnp.array([0]), comparisons=(1,))[0]), 4)  # y_0 - y_1
      1.0
    """
    squeeze = main.ndim == 1
    main = main[:, None] if squeeze else main  # (B, K)
    fixed = jax.lax.stop_gradient(scores)
    y_main = jnp.take_along_axis(fixed, main, axis=-1)  # (B, K)
    dist = jnp.abs(fixed[:, None, :] - y_main[..., None])  # (B, K, N)
    dist = jnp.where(jnp.arange(scores.shape[-1]) == main[..., None], jnp.inf, dist)
    nearest = jnp.argsort(dist, axis=-1)[..., jnp.asarray(comparisons) - 1]  # (B, K, M)
    probs = jax.nn.softmax(scores, axis=-1)
    full = jnp.broadcast_to(scores[:, None, :], dist.shape)
    y_j = jnp.take_along_axis(full, nearest, axis=-1)
    p_j = jnp.take_along_axis(jnp.broadcast_to(probs[:, None, :], dist.shape), nearest, axis=-1)
    y_c = jnp.take_along_axis(scores, main, axis=-1)[..., None]
    out = jnp.sum(p_j * (y_c - alpha * y_j), axis=-1) / (jnp.sum(p_j, axis=-1) + 1e-9)
    return out[:, 0] if squeeze else out


def finer_target(spec: TargetSpec, options: ExplainerOptions) -> TargetSpec:
    """The Finer-CAM score of ``spec``'s classes, as a callable target (``None``: each example's top
    class, read from the same scores)."""

    def score(s):
        main = fixed_top(spec, s).value
        return finer_scores(s, main, options.alpha, options.comparisons)

    return TargetSpec("fn", score)


def random_grads(tap: Tap, x, spec: TargetSpec, key) -> Grads:
    """``Grads`` whose ``grads`` are uniform in [-1, 1] per (example, [target,] channel), constant over
    positions: Grad-CAM's spatial mean then gives random channel weights."""
    scores, a = tap(x)
    selected = select_scores(fixed_top(spec, scores), scores)
    shape = selected.shape[::-1] + a.shape[-1:]  # (B, C) or (K, B, C)
    w = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    w = w.reshape(w.shape[:-1] + (1,) * (a.ndim - 2) + w.shape[-1:])
    return Grads(scores, a, jnp.broadcast_to(w, selected.shape[::-1] + a.shape[1:]), selected)


def explainer_maps(tap: Tap, x, target: TargetSpec, key, options: ExplainerOptions):
    """One forward pass of the explainer ``options.kind``: ``(maps, dead)``."""
    if options.kind == "shapley":
        out = shapley_grads(tap, x, target)
    elif options.kind == "finer":
        out = grads_for_spec(tap, x, finer_target(target, options))
    else:
        out = random_grads(tap, x, target, key)
    size, rank = map_geometry(x, options.maps, options.kind)
    maps = maps_from_grads(out, options.formula, options.maps, size, rank)
    if options.kind == "random":
        return maps, jnp.zeros(out.selected.shape, bool)
    return maps, zero_gradients(out, options.maps.drop_tokens)


@kernel
def explainer_kernel(tap: Tap, x, target: TargetSpec, key, *, options: ExplainerOptions):
    """ShapleyCAM's, Finer-CAM's or RandomCAM's maps under ``jit``: ``(maps, dead)``."""
    if not options.aug:
        return explainer_maps(tap, x, target, key, options)
    maps, dead = augmented_maps(
        lambda xa: explainer_maps(tap, xa, target, key, options), x, options.maps, "cam"
    )
    return maps, jnp.any(dead, axis=0)


def run_explainer(
    tap, x, target, options: ExplainerOptions, who: str, key=None, *, eigen_smooth: bool = False
):
    """The checks every explainer here makes in Python, then its kernel; refuses an all-zero ``dA``."""
    if eigen_smooth:
        options = dataclasses.replace(options, formula=methods.eigen_smoothed(options.formula))
    tap = as_tap(tap)
    check_cam_input(x, options.maps, who)
    if options.aug:
        check_aug_smooth(x, options.maps, who)
    spec = target_spec(target, batch_size(x))
    check_tap_target(tap, x, spec, who)
    if options.kind == "finer" and spec.kind == "fn":
        raise TypeError(
            f"{who}: the target must be class indices (None, an int, (B,) or (B, K)): Finer-CAM compares "
            f"a class with the classes scored nearest to it. For a callable target use another method."
        )
    maps, dead = explainer_kernel(tap, x, spec, key, options=options)
    if options.kind != "random":
        check_dead(dead, who)
    return maps


def shapley_cam(
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
    """ShapleyCAM: channel weights from the gradient and a Hessian-vector product.

    With ``g = dy^c/dA`` and ``H`` the Hessian of ``y^c`` in ``A``::

        w_k = (1/Z) sum_ij (g - 0.5 H A)^k_ij          L = ReLU( sum_k w_k A^k )

    — the first- and second-order terms of the channels' Shapley values (Cai 2024, eq. 12), as
    pytorch-grad-cam's ``ShapleyCAM``. ``H A`` is a forward-over-reverse product
    (``jax.linearize`` of the pullback) in the same forward pass: about three Grad-CAMs' cost, no
    graph kept alive between calls. Above a layer followed only by linear maps and ReLUs (a
    CNN's last stage, then pooling and a linear head) ``H = 0`` for a logit target and this is
    Grad-CAM; the paper pairs it with the ReST target ``y_c - CE(y, c) = y_c + log softmax(y)_c``
    (pass it as a callable target).

    Args:
      tap, x, target: as in :func:`gradcam_jax.cam`.
      upsample, normalize, relu, interpolation, counterfactual, drop_tokens, grid, layout, input,
        aug_smooth, eigen_smooth: as in :func:`gradcam_jax.cam`.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(jax.nn.relu, lambda a: jnp.tanh(a).mean(axis=(1, 2)) @ w)
      >>> from gradcam_jax.cams import shapley_cam
      >>> shapley_cam(tap, jnp.ones((2, 8, 8, 3)), target=[0, 4]).shape
      (2, 2, 8, 8)

    References:
      Cai, "CAMs as Shapley Value-based Explainers", The Visual Computer 2025,
      https://arxiv.org/abs/2501.06261.
    """
    maps = MapOptions(
        upsample, normalize, relu, interpolation, counterfactual, drop_tokens, grid, layout, input
    )
    options = ExplainerOptions("shapley", methods.grad_cam, maps, bool(aug_smooth))
    return run_explainer(tap, x, target, options, "shapley_cam", eigen_smooth=eigen_smooth)


def finer_cam(
    tap,
    x,
    target: Target = None,
    *,
    alpha: float = 1.0,
    comparisons: tuple[int, ...] = (1, 2, 3),
    base_method: str | Callable = "grad_cam",
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
    """Finer-CAM: what tells the class apart from the classes the model finds most similar.

    The base method (Grad-CAM by default) explains :func:`finer_scores` instead of ``y^c``::

        s = sum_{j in J} p_j (y_c - alpha y_j) / (sum_{j in J} p_j + 1e-9)

    with ``J`` the classes whose scores are nearest to ``y_c`` (ranks ``comparisons``; 1 is the
    nearest) and ``p = softmax(y)`` — pytorch-grad-cam's ``FinerCAM`` with its
    ``FinerWeightedTarget``. ``alpha = 0`` is the base method on ``y_c`` (times a constant);
    ``alpha = 1`` keeps only what differs between the class and its neighbours. One forward pass.

    Args:
      tap, x: as in :func:`gradcam_jax.cam`.
      target: class indices: ``None`` (each example's top class), an int, ``(B,)`` or ``(B, K)``.
      alpha: the weight of the comparison classes' scores.
      comparisons: the ranks (by score distance, 1-based) of the classes compared with.
      base_method: a gradient formula: a name (``"grad_cam"``, ``"grad_cam_plus_plus"``,
        ``"xgrad_cam"``, ``"hires_cam"``, ``"layer_cam"``, ``"grad_cam_elementwise"``, ``"cam"``)
        or a function ``(A, dA) -> (B, h, w)``.
      upsample, normalize, relu, interpolation, counterfactual, drop_tokens, grid, layout, input,
        aug_smooth, eigen_smooth: as in :func:`gradcam_jax.cam`.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(jax.nn.relu, lambda a: a.mean(axis=(1, 2)) @ w)
      >>> from gradcam_jax.cams import finer_cam
      >>> finer_cam(tap, jnp.ones((2, 8, 8, 3)), comparisons=(1, 2)).shape
      (2, 8, 8)

    References:
      Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
      Explanation", CVPR 2025, https://arxiv.org/abs/2501.11309.
    """
    comps = tuple(comparisons) if isinstance(comparisons, (tuple, list)) else (comparisons,)
    if not comps or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in comps):
        raise ValueError(
            f"finer_cam: comparisons must be ranks >= 1 (1 = the class scored nearest); got {comparisons!r}."
        )
    n_classes = _class_count(tap, x)
    if n_classes is not None and max(comps) >= n_classes:
        raise ValueError(
            f"finer_cam: comparisons={comps} asks for the class ranked {max(comps)}, but the model has "
            f"{n_classes} classes, so at most {n_classes - 1} others to compare with."
        )
    formula = methods.formula(base_method) if isinstance(base_method, str) else base_method
    maps = MapOptions(
        upsample, normalize, relu, interpolation, counterfactual, drop_tokens, grid, layout, input
    )
    options = ExplainerOptions("finer", formula, maps, bool(aug_smooth), float(alpha), comps)
    return run_explainer(tap, x, target, options, "finer_cam", eigen_smooth=eigen_smooth)


def _class_count(tap, x) -> int | None:
    try:
        shape = tap_shapes(as_tap(tap), x)[0].shape
    except (AttributeError, TypeError, ValueError):
        return None  # the target checks say what is wrong
    return shape[-1] if len(shape) == 2 else None


def random_cam(
    tap,
    x,
    target: Target = None,
    *,
    key=None,
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
    """RandomCAM: ``L = ReLU(sum_k w_k A^k)`` with ``w_k ~ U(-1, 1)`` — a baseline for the metrics.

    One weight per (example, target, channel), drawn from ``key``; the target only decides the
    output's shape and which scores must be finite (no gradient is computed). A method that
    scores no better than this on a metric explains nothing the metric can see.

    Args:
      tap, x, target: as in :func:`gradcam_jax.cam`.
      key: a ``jax.random`` key (required: the same key gives the same maps).
      upsample, normalize, relu, interpolation, drop_tokens, grid, layout, input, aug_smooth,
        eigen_smooth: as in :func:`gradcam_jax.cam`; ``counterfactual`` negates the weights
        (the same distribution).

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> tap = gcj.split_tap(jax.nn.relu, lambda a: a.mean(axis=(1, 2)))
      >>> from gradcam_jax.cams import random_cam
      >>> random_cam(tap, jnp.ones((2, 8, 8, 3)), key=jax.random.key(0)).shape
      (2, 8, 8)

    References:
      pytorch-grad-cam's ``RandomCAM`` (https://github.com/jacobgil/pytorch-grad-cam).
    """
    if key is None:
        raise ValueError("random_cam needs key=jax.random.key(seed): the maps are drawn from it.")
    maps = MapOptions(
        upsample, normalize, relu, interpolation, counterfactual, drop_tokens, grid, layout, input
    )
    options = ExplainerOptions("random", methods.grad_cam, maps, bool(aug_smooth))
    return run_explainer(tap, x, target, options, "random_cam", key, eigen_smooth=eigen_smooth)
