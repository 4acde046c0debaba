"""Perturbation CAMs: Score-CAM, Ablation-CAM and sliding-window occlusion, batched under jit.

These methods weight the channels (or the pixels) by what happens to the explained score when
the input or the activation is perturbed, not by gradients. Their cost is many forward passes:

- :func:`score_cam`: one forward pass of the whole model per channel (the input masked by that
  channel's upsampled activation);
- :func:`ablation_cam`: one pass of the part of the model *above* the tapped layer per channel
  (that channel set to zero) — ``tap.head``, so under ``jit`` the layers below are not rerun;
- :func:`occlusion` (in :mod:`gradcam_jax.occlusion`, re-exported here): one forward pass per
  position of a sliding window.

All the perturbed passes are ``vmap``-ed and run in a ``lax.scan`` over chunks of about
``chunk_size`` perturbed inputs, so peak memory is set by ``chunk_size`` (and the batch), never
by the number of channels or windows. The masks are built inside each chunk from the
layer-resolution activation, so no ``(C, B, H, W)`` tensor is ever materialised. The K targets
of a ``(B, K)`` target share one set of perturbed passes (K selections of the same scores).

Targets are as in :func:`gradcam_jax.grad_cam`. ``None`` means each example's top class *on the
unperturbed input* (it is fixed once, not re-chosen on every perturbed input); a callable
target is applied to the scores of every perturbed batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._chunking import chunked_vmap, perturbations_per_step
from ._grads import check_tap_target
from ._inputs import image_of, spatial_size, with_image
from ._maps import MapOptions, check_cam_input, check_images, finish_maps, kernel, map_geometry, to_grid
from ._smoothing import augmented_maps, check_aug_smooth
from ._tap import Tap, as_tap
from ._targets import (
    Target,
    TargetSpec,
    batch_size,
    fixed_top,
    select_scores,
    target_spec,
)
from .methods import first_component, safe_divide
from .occlusion import occlusion as occlusion
from .occlusion import window_starts as window_starts
from .postprocess import normalize_maps, upsample_to

__all__ = ["score_cam", "ablation_cam", "occlusion", "window_starts"]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerturbationOptions:
    """The static options of a perturbation CAM kernel."""

    maps: MapOptions
    per_step: int
    compute_dtype: Any = None
    top_n: int | None = None
    aug: bool = False
    eigen: bool = False


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
    maps: MapOptions, chunk_size, batch: int, compute_dtype, top_n=None, aug=False, eigen=False
) -> PerturbationOptions:
    per_step = perturbations_per_step(chunk_size, batch)
    return PerturbationOptions(maps, per_step, check_dtype(compute_dtype), top_n, bool(aug), bool(eigen))


def smoothed(body, tap: Tap, x, target, options, who: str):
    """``body(tap, x, target, options)`` (finished maps), averaged over augmented copies of ``x`` when
    ``options.aug`` (``aug_smooth``; the copies run as one ``vmap``-ed batch)."""
    if not options.aug:
        return body(tap, x, target, options)
    maps, _ = augmented_maps(lambda xa: (body(tap, xa, target, options), None), x, options.maps, who)
    return maps


# --------------------------------------------------------------------------------------------
# Score-CAM
# --------------------------------------------------------------------------------------------


def _top_spread_channels(a, top_n: int | None):
    """Faster Score-CAM: each example's ``top_n`` channels by spatial standard deviation."""
    if top_n is None or top_n >= a.shape[-1]:
        return a
    _, keep = jax.lax.top_k(jnp.std(a, axis=tuple(range(1, a.ndim - 1))), top_n)  # (B, N)
    return jnp.take_along_axis(a, keep.reshape((keep.shape[0],) + (1,) * (a.ndim - 2) + (top_n,)), axis=-1)


@kernel
def score_cam_kernel(tap: Tap, x, target: TargetSpec, *, options: PerturbationOptions):
    """Score-CAM's maps under ``jit`` (see :func:`score_cam`)."""
    return smoothed(score_cam_maps, tap, x, target, options, "score_cam")


def score_cam_maps(tap: Tap, x, target: TargetSpec, options: PerturbationOptions, variant=None, key=None):
    """Score-CAM's finished maps (traced inside the kernel).

    ``variant`` (static; SS-CAM's and IS-CAM's, :mod:`gradcam_jax.score_variants`) scores
    ``variant.n`` perturbed copies ``variant.mask(mask, sample, item, key)`` of each channel's
    mask and averages them; ``item = channel * n + sample`` numbers the masked forwards.
    """
    maps = options.maps
    clean_scores, act = tap(x)
    spec = fixed_top(target, clean_scores)
    view = check_images(x, maps, "score_cam")
    image_size, rank = spatial_size(x, view), view.spatial_rank
    a = to_grid(act, maps.drop_tokens, maps.grid, rank).astype(jnp.float32)
    a = _top_spread_channels(a, options.top_n)
    channels = jnp.moveaxis(a, -1, 0)  # (N, B, *spatial): one layer-resolution map per channel
    fwd = in_dtype(tap, options.compute_dtype)
    xin = cast_floating(x, options.compute_dtype)
    image = image_of(xin, view)  # (B, *spatial, C)

    n = 1 if variant is None else variant.n

    def masked_score(item):
        channel = channels[item // n]
        mask = normalize_maps(upsample_to(channel, image_size, maps.interpolation), rank)  # in [0, 1]
        if variant is not None:
            mask = variant.mask(mask, item % n, item, key)
        scores, _ = fwd(with_image(xin, view, image * mask[..., None].astype(image.dtype)))
        return select_scores(spec, scores).astype(jnp.float32)

    items = jnp.arange(channels.shape[0] * n, dtype=jnp.int32)
    masked = chunked_vmap(masked_score, items, options.per_step)  # (N * n, B) or (N * n, B, K)
    masked = jnp.mean(masked.reshape((channels.shape[0], n) + masked.shape[1:]), axis=1)
    # softmax_k(y(x*m_k) - y(baseline)) == softmax_k(y(x*m_k)): the baseline is constant in k.
    alpha = jax.nn.softmax(masked, axis=0)
    size, _ = map_geometry(x, maps, "score_cam")
    clean = select_scores(spec, clean_scores)  # NaN here: a NaN map, not a quiet one
    return finish_maps(weighted_channels(alpha, a, options.eigen), maps, size, rank, clean)


def score_cam(
    tap,
    x,
    target: Target = None,
    *,
    chunk_size: int = 64,
    top_n: int | None = None,
    compute_dtype=None,
    upsample: bool = True,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
) -> jax.Array:
    """Score-CAM: channels weighted by the score of the input masked with each channel.

    For each channel ``k`` of the activation ``A`` at the tap: upsample ``A^k`` to the image
    size, min-max normalise it to ``M_k`` in [0, 1] (a constant channel gives ``M_k = 0``),
    and score the masked image ``x ⊙ M_k``. Then::

        alpha_k = softmax_k( y^c(x ⊙ M_k) - y^c(x_b) )      L = ReLU( sum_k alpha_k A^k )

    with ``x_b`` the baseline (zero) image. The baseline score is the same for every channel
    and softmax is shift-invariant, so it cancels: it is not computed (one forward saved). The
    weights are then those of pytorch-grad-cam's ``ScoreCAM`` (a softmax of the masked scores)
    except for the masks' upsampling: it uses ``align_corners=True``, masks here use half-pixel
    centres, like the maps. ``y^c`` is the score before any softmax over classes (a logit), as
    in the paper's Algorithm 1.

    Cost: one forward pass of the whole model per (example, channel) — 2048 per image at
    ResNet-50's last stage — plus the one that computes ``A``. The masked passes run
    ``max(1, chunk_size // B)`` channels at a time for the whole batch (about ``chunk_size``
    masked images per step), so memory does not grow with the channel count.

    Args:
      tap: the model split at a layer (:func:`~gradcam_jax.linen_tap`, ...).
      x: images ``(B, H, W, C)``.
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is each example's top class on the
        unmasked input. K targets share the masked forwards.
      chunk_size: masked images per step (rounded down to whole batches, at least one batch).
        It changes speed and memory, not the result.
      top_n: keep, per example, only the ``top_n`` channels with the largest spatial standard
        deviation of ``A^k`` — the criterion of Faster Score-CAM (tabayashi0117), also
        tf-keras-vis's ``max_N``, which takes the union over the batch where this selects per
        example. Nearly constant channels give nearly empty masks. ``None``: all channels.
      compute_dtype: run the masked forwards in this dtype (e.g. ``jnp.bfloat16``): the masked
        images and the tap's floating parameters are cast; scores and weights stay ``float32``.
        Layers that fix their own computation dtype (Flax ``dtype=jnp.float32``) keep it: build
        such a model with ``dtype=jnp.bfloat16`` instead. On CPUs bfloat16 is rarely faster.
      upsample, normalize, relu, interpolation, drop_tokens, grid, layout, input, aug_smooth,
        eigen_smooth: as in :func:`gradcam_jax.cam`. ``interpolation`` also upsamples the masks.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> from gradcam_jax.perturbation import score_cam
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jax.nn.relu(x[:, ::2, ::2]), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> score_cam(tap, jnp.ones((2, 8, 8, 3)), target=[0, 4], chunk_size=4).shape
      (2, 2, 8, 8)

    References:
      Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
      Networks", CVPR Workshops 2020, https://arxiv.org/abs/1910.01279 (Algorithm 1).
      Faster Score-CAM: https://github.com/tabayashi0117/Score-CAM#faster-score-cam.
    """
    # long-function: the docstring documents every option; the body is the checks and one kernel call.
    maps = MapOptions(upsample, normalize, relu, interpolation, False, drop_tokens, grid, layout, input)
    tap, batch, spec = prepare_perturbation(tap, x, target, "score_cam", maps, images=True, aug=aug_smooth)
    if top_n is not None and (
        isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1
    ):
        raise ValueError(f"top_n must be a positive int (channels kept per example) or None; got {top_n!r}.")
    top_n = None if top_n is None else int(top_n)
    options = perturbation_options(maps, chunk_size, batch, compute_dtype, top_n, aug_smooth, eigen_smooth)
    return score_cam_kernel(tap, x, spec, options=options)


# --------------------------------------------------------------------------------------------
# Ablation-CAM
# --------------------------------------------------------------------------------------------


@kernel
def ablation_cam_kernel(tap: Tap, x, target: TargetSpec, *, options: PerturbationOptions):
    """Ablation-CAM's maps under ``jit`` (see :func:`ablation_cam`)."""
    return smoothed(ablation_cam_maps, tap, x, target, options, "ablation_cam")


def ablation_cam_maps(tap: Tap, x, target: TargetSpec, options: PerturbationOptions):
    """Ablation-CAM's finished maps (traced inside the kernel)."""
    dtype = options.compute_dtype
    clean_scores, act = tap(x)
    spec = fixed_top(target, clean_scores)
    head_tap = in_dtype(tap, dtype)
    xin = cast_floating(x, dtype)
    act_in = act if dtype is None else act.astype(dtype)

    def head_score(a_new):
        return select_scores(spec, head_tap.head(xin, a_new)).astype(jnp.float32)

    # The reference score goes through the same path (and dtype) as the ablated ones, so that a
    # reduced-precision run compares like with like.
    y = select_scores(spec, clean_scores).astype(jnp.float32) if dtype is None else head_score(act_in)
    channel_ids = jnp.arange(act.shape[-1])

    def ablated_score(k):
        return head_score(jnp.where(channel_ids == k, jnp.zeros((), act_in.dtype), act_in))

    ablated = chunked_vmap(ablated_score, channel_ids, options.per_step)  # (C, B) or (C, B, K)
    weights = safe_divide(y[None] - ablated, jnp.broadcast_to(y[None], ablated.shape))
    size, rank = map_geometry(x, options.maps, "ablation_cam")
    a = to_grid(act, options.maps.drop_tokens, options.maps.grid, rank).astype(jnp.float32)
    rank = 2 if rank is None else rank
    return finish_maps(
        weighted_channels(weights, a, options.eigen), options.maps, size, rank, y
    )  # NaN y: NaN


def ablation_cam(
    tap,
    x,
    target: Target = None,
    *,
    chunk_size: int = 64,
    compute_dtype=None,
    upsample: bool = True,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
) -> jax.Array:
    """Ablation-CAM: channels weighted by the drop of the score when each one is zeroed.

    With ``y^c`` the explained score and ``y^c_k`` the same score when channel ``k`` of the
    tapped activation is set to zero (everywhere: every position, every token)::

        w_k = (y^c - y^c_k) / y^c          L = ReLU( sum_k w_k A^k )

    ``w_k = 0`` for an example whose ``y^c`` is exactly 0 (no NaN). Dividing by ``y^c`` scales
    all the weights of one map by the same number; when ``y^c < 0`` that flips the map's sign
    before the final ReLU, which then keeps the regions whose removal *raises* the score (the
    paper's formula, taken literally; explain a positive score, e.g. a logit of a predicted
    class, to avoid it). pytorch-grad-cam ablates with
    ``min(A) - 1e7`` instead of 0 when the activation has negative values; this follows the
    paper.

    Only the part of the model above the layer reruns (``tap.head``): under ``jit`` the layers
    below are dead code. The ablated passes run ``max(1, chunk_size // B)`` channels at a time
    for the whole batch.

    Args:
      tap: the model split at a layer.
      x: the input batch (images ``(B, H, W, C)`` when ``upsample=True``).
      target: as in :func:`gradcam_jax.grad_cam`; K targets share the ablated passes.
      chunk_size: ablated examples per step (rounded down to whole batches, at least one).
      compute_dtype: run the head passes (the reference ``y^c`` included) in this dtype (the
        activation and the tap's floating parameters are cast; see :func:`score_cam`).
      upsample, normalize, relu, interpolation, drop_tokens, grid, layout, input, aug_smooth,
        eigen_smooth: as in :func:`gradcam_jax.cam`.

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> from gradcam_jax.perturbation import ablation_cam
      >>> w = jax.random.normal(jax.random.key(0), (3, 5))
      >>> tap = gcj.split_tap(lambda x: jax.nn.relu(x[:, ::2, ::2]), lambda a: a.mean(axis=(1, 2)) @ w)
      >>> ablation_cam(tap, jnp.ones((2, 8, 8, 3)), upsample=False).shape
      (2, 4, 4)

    References:
      Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
      Gradient-free Localization", WACV 2020,
      https://openaccess.thecvf.com/content_WACV_2020/html/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.html
      (eq. 3).
    """
    maps = MapOptions(upsample, normalize, relu, interpolation, False, drop_tokens, grid, layout, input)
    tap, batch, spec = prepare_perturbation(
        tap, x, target, "ablation_cam", maps, images=False, aug=aug_smooth
    )
    options = perturbation_options(maps, chunk_size, batch, compute_dtype, None, aug_smooth, eigen_smooth)
    return ablation_cam_kernel(tap, x, spec, options=options)
