"""Perturbation CAMs: Score-CAM, Ablation-CAM and sliding-window occlusion, batched under jit.

These methods weight the channels (or the pixels) by what happens to the explained score when
the input or the activation is perturbed, not by gradients. Their cost is many forward passes:

- :func:`score_cam`: one forward pass of the whole model per channel (the input masked by that
  channel's upsampled activation);
- :func:`ablation_cam`: one pass of the part of the model *above* the tapped layer per channel
  (that channel set to zero) — ``tap.head``, so under ``jit`` the layers below are not rerun;
- :func:`occlusion` (in :mod:`gradcam_jax.occlusion`, re-exported here): one forward pass per
  position of a sliding window.

All the perturbed passes are ``vmap``-ed and run in chunks of about ``chunk_size`` perturbed
inputs, so peak memory is set by ``chunk_size`` (and the batch), never by the number of
channels or windows; the chunks loop in a ``lax.map`` inside one jitted kernel or, with
``chunk_loop="host"``, from Python over one jitted chunk kernel (:mod:`gradcam_jax._chunking`).
The masks are built inside each chunk from the layer-resolution activation, so no
``(C, B, H, W)`` tensor is ever materialised. The K targets of a ``(B, K)`` target share one
set of perturbed passes (K selections of the same scores).

Targets are as in :func:`gradcam_jax.grad_cam`. ``None`` means each example's top class *on the
unperturbed input* (it is fixed once, not re-chosen on every perturbed input); a callable
target is applied to the scores of every perturbed batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._chunking import Stages, run_on_device
from ._inputs import image_of, spatial_size, with_image
from ._maps import MapOptions, check_images, finish_maps, kernel, map_geometry, to_grid
from ._perturbation_common import (
    PerturbationOptions,
    cast_floating,
    in_dtype,
    perturbation_options,
    prepare_perturbation,
    run_perturbation,
    smoothed,
    weighted_channels,
)
from ._tap import Tap
from ._targets import Target, TargetSpec, fixed_top, select_scores
from .methods import safe_divide
from .occlusion import occlusion as occlusion
from .occlusion import window_starts as window_starts
from .postprocess import normalize_maps, upsample_to

__all__ = ["score_cam", "ablation_cam", "occlusion", "window_starts"]

# --------------------------------------------------------------------------------------------
# Score-CAM
# --------------------------------------------------------------------------------------------


def _top_spread_channels(a, top_n: int | None):
    """Faster Score-CAM: each example's ``top_n`` channels by spatial standard deviation."""
    if top_n is None or top_n >= a.shape[-1]:
        return a
    _, keep = jax.lax.top_k(jnp.std(a, axis=tuple(range(1, a.ndim - 1))), top_n)  # (B, N)
    return jnp.take_along_axis(a, keep.reshape((keep.shape[0],) + (1,) * (a.ndim - 2) + (top_n,)), axis=-1)


def score_start(args, options: PerturbationOptions):
    """The clean pass: ``(spec, clean scores, A (B, *spatial, N) float32)``, ``top_n`` applied."""
    tap, x, target, _ = args
    clean_scores, act = tap(x)
    rank = check_images(x, options.maps, "score_cam").spatial_rank
    a = to_grid(act, options.maps.drop_tokens, options.maps.grid, rank).astype(jnp.float32)
    return fixed_top(target, clean_scores), clean_scores, _top_spread_channels(a, options.top_n)


def masked_score(args, carry, item, options: PerturbationOptions):
    """``y^c(x ⊙ M_k)``, ``k = item // n``: the image masked by channel ``k`` upsampled and
    normalised to [0, 1] (with a variant, its sample ``item % n`` of that mask)."""
    tap, x, _, key = args
    spec, _, a = carry
    maps, variant = options.maps, options.variant
    view = check_images(x, maps, "score_cam")
    n = 1 if variant is None else variant.n
    channel = jnp.take(a, item // n, axis=-1)  # (B, *spatial) at the layer's resolution
    mask = normalize_maps(upsample_to(channel, spatial_size(x, view), maps.interpolation), view.spatial_rank)
    if variant is not None:
        mask = variant.mask(mask, item % n, item, key)
    xin = cast_floating(x, options.compute_dtype)
    image = image_of(xin, view)  # (B, *spatial, C)
    scores, _ = in_dtype(tap, options.compute_dtype)(
        with_image(xin, view, image * mask[..., None].astype(image.dtype))
    )
    return select_scores(spec, scores).astype(jnp.float32)


def score_finish(args, carry, masked, options: PerturbationOptions):
    """``ReLU(sum_k softmax_k(mean_sample y^c(x ⊙ M_k)) A^k)``, finished; ``masked`` ``(N n, B[, K])``."""
    x = args[1]
    spec, clean_scores, a = carry
    n = 1 if options.variant is None else options.variant.n
    masked = jnp.mean(masked.reshape((a.shape[-1], n) + masked.shape[1:]), axis=1)
    # softmax_k(y(x*m_k) - y(baseline)) == softmax_k(y(x*m_k)): the baseline is constant in k.
    alpha = jax.nn.softmax(masked, axis=0)
    size, _ = map_geometry(x, options.maps, "score_cam")
    rank = check_images(x, options.maps, "score_cam").spatial_rank
    clean = select_scores(spec, clean_scores)  # NaN here: a NaN map, not a quiet one
    return finish_maps(weighted_channels(alpha, a, options.eigen), options.maps, size, rank, clean)


SCORE_CAM = Stages(
    score_start,
    lambda args, carry, o: carry[2].shape[-1] * (o.variant.n if o.variant else 1),
    masked_score,
    score_finish,
    auto_host=False,  # forward-only chunks: "auto" keeps the device loop (see _chunking.Stages)
)


@kernel
def score_cam_kernel(tap: Tap, x, target: TargetSpec, key=None, *, options: PerturbationOptions):
    """Score-CAM's (SS-CAM's, IS-CAM's with ``options.variant``) maps under ``jit`` (see
    :func:`score_cam`); ``key``: the variant's randomness."""

    def body(tap, x, target, options):
        return run_on_device(SCORE_CAM, (tap, x, target, key), options, options.per_step)

    who = "score_cam" if options.variant is None else options.variant.who
    return smoothed(body, tap, x, target, options, who)


def score_cam(
    tap,
    x,
    target: Target = None,
    *,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
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
      chunk_loop: how several chunks run: ``"auto"`` (default) and ``"device"``: in one
        ``lax.map`` inside one jitted kernel; ``"host"``: from Python over one jitted chunk
        kernel (compiled once, dispatched asynchronously, the scores kept on the device; not
        with ``aug_smooth``). Unlike the gradient paths of
        :func:`~gradcam_jax.integrated_gradients`, whose ``"auto"`` picks the host loop on a
        CPU, these forward-only chunks ran faster in the device loop on XLA:CPU (the host loop at
        0.78-0.96x its speed; :class:`~gradcam_jax._chunking.Stages`).
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
    args = (tap, x, spec, None)
    return run_perturbation(score_cam_kernel, SCORE_CAM, args, options, chunk_loop, "score_cam")


# --------------------------------------------------------------------------------------------
# Ablation-CAM
# --------------------------------------------------------------------------------------------


def head_score(args, spec: TargetSpec, a_new, options: PerturbationOptions):
    """``y^c`` from the tap's head on the activation ``a_new``, in ``options.compute_dtype``."""
    tap, x, _ = args
    dtype = options.compute_dtype
    return select_scores(spec, in_dtype(tap, dtype).head(cast_floating(x, dtype), a_new)).astype(jnp.float32)


def ablation_start(args, options: PerturbationOptions):
    """The clean pass: ``(spec, A, y^c)``."""
    tap, x, target = args
    clean_scores, act = tap(x)
    spec = fixed_top(target, clean_scores)
    if options.compute_dtype is None:
        return spec, act, select_scores(spec, clean_scores).astype(jnp.float32)
    # The reference score goes through the same path (and dtype) as the ablated ones, so that a
    # reduced-precision run compares like with like.
    return spec, act, head_score(args, spec, act.astype(options.compute_dtype), options)


def ablated_score(args, carry, k, options: PerturbationOptions):
    """``y^c_k``: the head's score with channel ``k`` of ``A`` set to zero."""
    spec, act, _ = carry
    act_in = act if options.compute_dtype is None else act.astype(options.compute_dtype)
    ablated = jnp.where(jnp.arange(act.shape[-1]) == k, jnp.zeros((), act_in.dtype), act_in)
    return head_score(args, spec, ablated, options)


def ablation_finish(args, carry, ablated, options: PerturbationOptions):
    """``ReLU(sum_k (y^c - y^c_k) / y^c A^k)``, finished; ``ablated`` ``(C, B[, K])``."""
    _, act, y = carry
    weights = safe_divide(y[None] - ablated, jnp.broadcast_to(y[None], ablated.shape))
    size, rank = map_geometry(args[1], options.maps, "ablation_cam")
    a = to_grid(act, options.maps.drop_tokens, options.maps.grid, rank).astype(jnp.float32)
    rank = 2 if rank is None else rank
    eigen = options.eigen
    return finish_maps(weighted_channels(weights, a, eigen), options.maps, size, rank, y)  # NaN y: NaN


ABLATION_CAM = Stages(
    ablation_start, lambda args, carry, o: carry[1].shape[-1], ablated_score, ablation_finish, auto_host=False
)


@kernel
def ablation_cam_kernel(tap: Tap, x, target: TargetSpec, *, options: PerturbationOptions):
    """Ablation-CAM's maps under ``jit`` (see :func:`ablation_cam`)."""

    def body(tap, x, target, options):
        return run_on_device(ABLATION_CAM, (tap, x, target), options, options.per_step)

    return smoothed(body, tap, x, target, options, "ablation_cam")


def ablation_cam(
    tap,
    x,
    target: Target = None,
    *,
    chunk_size: int = 64,
    chunk_loop: str = "auto",
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
      chunk_loop: as in :func:`score_cam` (``"auto"``: the device loop; ``"host"``: the chunks
        of head passes from Python over one jitted chunk kernel).
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
    args = (tap, x, spec)
    return run_perturbation(ablation_cam_kernel, ABLATION_CAM, args, options, chunk_loop, "ablation_cam")
