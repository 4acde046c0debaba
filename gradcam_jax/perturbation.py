"""Perturbation CAMs: Score-CAM, Ablation-CAM and sliding-window occlusion, batched under jit.

These methods weight the channels (or the pixels) by what happens to the explained score when
the input or the activation is perturbed, not by gradients. Their cost is many forward passes:

- :func:`score_cam`: one forward pass of the whole model per channel (the input masked by that
  channel's upsampled activation);
- :func:`ablation_cam`: one pass of the part of the model *above* the tapped layer per channel
  (that channel set to zero) — ``tap.head``, so under ``jit`` the layers below are not rerun;
- :func:`occlusion`: one forward pass per position of a sliding window.

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

import functools
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ._callables import combine_callable, partition_callable, scores_fn
from ._chunking import map_in_chunks
from ._core import (
    Target,
    TargetSpec,
    _batch_size,
    check_target_against,
    jit_target_fn,
    jit_target_value,
    select_scores,
    spec_from_jit,
    target_spec,
)
from ._explain import (
    _check_common,
    _check_range_eagerly,
    _image_size,
    check_image_batch,
    finish_maps,
    to_grid,
)
from ._tap import Tap, as_tap
from .methods import safe_divide
from .postprocess import normalize_maps, upsample_to

__all__ = ["score_cam", "ablation_cam", "occlusion", "METHODS"]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _per_step(chunk_size, batch: int) -> int:
    """Perturbations per scan step: each perturbation is a whole batch of ``batch`` inputs."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (perturbed inputs per step, bounding peak memory); "
            f"got {chunk_size!r}."
        )
    return max(1, int(chunk_size) // max(int(batch), 1))


def _chunked_map(f, xs, per_step: int):
    """``vmap(f)(xs)`` evaluated ``per_step`` elements at a time (see :func:`map_in_chunks`)."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    return map_in_chunks(lambda idx: jax.vmap(f)(jax.tree_util.tree_map(lambda v: v[idx], xs)), n, per_step)


def _fixed_spec(kind: str, value, target_fn, clean_scores) -> TargetSpec:
    """The target with ``None`` resolved to the top class of the *unperturbed* scores."""
    if kind == "fn":
        return spec_from_jit(kind, value, target_fn)
    if kind == "top":
        select_scores(TargetSpec("top", None), clean_scores)  # checks the scores are (B, classes)
        return TargetSpec("index", jnp.argmax(jax.lax.stop_gradient(clean_scores), axis=-1).astype(jnp.int32))
    return TargetSpec(kind, value)


def _check_dtype(compute_dtype):
    if compute_dtype is None:
        return None
    dt = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"compute_dtype must be a floating dtype such as jnp.bfloat16; got {dt}.")
    return dt


def _cast_floating(tree, dtype):
    if dtype is None:
        return tree

    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf).astype(dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def _in_dtype(tap: Tap, compute_dtype) -> Tap:
    """The same split with the floating parameters cast to ``compute_dtype``.

    Weights captured in closures (``split_tap``) are not parameters and keep their dtype; the
    computation then promotes to the wider dtype.
    """
    return tap if compute_dtype is None else tap.with_params(_cast_floating(tap.params, compute_dtype))


def _weighted(weights, a):
    """``sum_k w_k A^k``: weights ``(N, B)`` or ``(N, B, K)``, ``a`` ``(B, h, w, N)``."""
    if weights.ndim == 2:
        return jnp.einsum("nb,bhwn->bhw", weights, a, precision=_HIGHEST)
    return jnp.einsum("nbk,bhwn->bkhw", weights, a, precision=_HIGHEST)


def _prepare(tap, x, target, interpolation, upsample, who):
    tap = as_tap(tap)
    batch = _check_common(x, interpolation)
    check_image_batch(x, who)
    spec = target_spec(target, batch)
    _check_range_eagerly(tap, x, spec)
    return tap, batch, spec, _image_size(x, upsample)


# --------------------------------------------------------------------------------------------
# Score-CAM
# --------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("kind", "target_fn", "per_step", "top_n", "compute_dtype", "size", "relu",
                     "upsample", "normalize", "interpolation", "drop_tokens", "grid"),
)
def _score_cam_jit(tap, x, target_value, *, kind, target_fn, per_step, top_n, compute_dtype, size,
                   relu, upsample, normalize, interpolation, drop_tokens, grid):
    clean_scores, act = tap(x)
    spec = _fixed_spec(kind, target_value, target_fn, clean_scores)
    a = to_grid(act, drop_tokens, grid).astype(jnp.float32)  # (B, h, w, C)
    if top_n is not None and top_n < a.shape[-1]:
        # Faster Score-CAM: keep each example's top_n channels by spatial standard deviation.
        spread = jnp.std(a, axis=(1, 2))
        _, keep = jax.lax.top_k(spread, top_n)  # (B, N)
        a = jnp.take_along_axis(a, keep[:, None, None, :], axis=-1)
    channels = jnp.moveaxis(a, -1, 0)  # (N, B, h, w): one layer-resolution map per channel
    fwd = _in_dtype(tap, compute_dtype)
    xin = x if compute_dtype is None else x.astype(compute_dtype)
    image_size = tuple(x.shape[1:3])

    def masked_score(channel):
        mask = normalize_maps(upsample_to(channel, image_size, interpolation))  # (B, H, W) in [0, 1]
        scores, _ = fwd(xin * mask[..., None].astype(xin.dtype))
        return select_scores(spec, scores).astype(jnp.float32)

    masked = _chunked_map(masked_score, channels, per_step)  # (N, B) or (N, B, K)
    # softmax_k(y(x*m_k) - y(baseline)) == softmax_k(y(x*m_k)): the baseline is constant in k.
    alpha = jax.nn.softmax(masked, axis=0)
    return finish_maps(_weighted(alpha, a), size=size, relu=relu, upsample=upsample,
                       normalize=normalize, interpolation=interpolation)


def score_cam(tap, x, target: Target = None, *, chunk_size: int = 64, top_n: Optional[int] = None,
              compute_dtype=None, upsample: bool = True, normalize: bool = True, relu: bool = True,
              interpolation: str = "bilinear", drop_tokens: int = 0,
              grid: Optional[Tuple[int, int]] = None) -> jax.Array:
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
      upsample, normalize, relu, interpolation, drop_tokens, grid: as in
        :func:`gradcam_jax.cam`. ``interpolation`` also upsamples the masks.

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
    tap, batch, spec, size = _prepare(tap, x, target, interpolation, upsample, "score_cam")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1):
        raise ValueError(f"top_n must be a positive int (channels kept per example) or None; got {top_n!r}.")
    return _score_cam_jit(
        tap, x, jit_target_value(spec),
        kind=spec.kind, target_fn=jit_target_fn(spec),
        per_step=_per_step(chunk_size, batch), top_n=None if top_n is None else int(top_n),
        compute_dtype=_check_dtype(compute_dtype), size=size, relu=bool(relu),
        upsample=bool(upsample), normalize=bool(normalize), interpolation=interpolation,
        drop_tokens=int(drop_tokens), grid=None if grid is None else tuple(int(v) for v in grid),
    )


# --------------------------------------------------------------------------------------------
# Ablation-CAM
# --------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("kind", "target_fn", "per_step", "compute_dtype", "size", "relu", "upsample",
                     "normalize", "interpolation", "drop_tokens", "grid"),
)
def _ablation_cam_jit(tap, x, target_value, *, kind, target_fn, per_step, compute_dtype, size,
                      relu, upsample, normalize, interpolation, drop_tokens, grid):
    clean_scores, act = tap(x)
    spec = _fixed_spec(kind, target_value, target_fn, clean_scores)
    head_tap = _in_dtype(tap, compute_dtype)
    xin = x if compute_dtype is None else x.astype(compute_dtype)
    act_in = act if compute_dtype is None else act.astype(compute_dtype)

    def head_score(a_new):
        return select_scores(spec, head_tap.head(xin, a_new)).astype(jnp.float32)

    # The reference score goes through the same path (and dtype) as the ablated ones, so that a
    # reduced-precision run compares like with like.
    y = select_scores(spec, clean_scores).astype(jnp.float32) if compute_dtype is None else head_score(act_in)
    num_channels = act.shape[-1]
    channel_ids = jnp.arange(num_channels)

    def ablated_score(k):
        return head_score(jnp.where(channel_ids == k, jnp.zeros((), act_in.dtype), act_in))

    ablated = _chunked_map(ablated_score, channel_ids, per_step)  # (C, B) or (C, B, K)
    weights = safe_divide(y[None] - ablated, jnp.broadcast_to(y[None], ablated.shape))
    a = to_grid(act, drop_tokens, grid).astype(jnp.float32)
    return finish_maps(_weighted(weights, a), size=size, relu=relu, upsample=upsample,
                       normalize=normalize, interpolation=interpolation)


def ablation_cam(tap, x, target: Target = None, *, chunk_size: int = 64, compute_dtype=None,
                 upsample: bool = True, normalize: bool = True, relu: bool = True,
                 interpolation: str = "bilinear", drop_tokens: int = 0,
                 grid: Optional[Tuple[int, int]] = None) -> jax.Array:
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
      upsample, normalize, relu, interpolation, drop_tokens, grid: as in
        :func:`gradcam_jax.cam`.

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
    tap = as_tap(tap)
    batch = _check_common(x, interpolation)
    spec = target_spec(target, batch)
    _check_range_eagerly(tap, x, spec)
    size = _image_size(x, upsample)
    return _ablation_cam_jit(
        tap, x, jit_target_value(spec),
        kind=spec.kind, target_fn=jit_target_fn(spec),
        per_step=_per_step(chunk_size, batch), compute_dtype=_check_dtype(compute_dtype),
        size=size, relu=bool(relu), upsample=bool(upsample), normalize=bool(normalize),
        interpolation=interpolation, drop_tokens=int(drop_tokens),
        grid=None if grid is None else tuple(int(v) for v in grid),
    )


# --------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of a window sliding along one axis: ``0, s, 2s, ...``.

    Captum's convention: ``ceil((size - window) / stride) + 1`` positions, the last window
    clipped at the border when ``stride`` does not divide ``size - window`` — so with
    ``stride <= window`` every pixel is covered at least once.
    """
    return np.arange(-(-(size - window) // stride) + 1) * stride


def _window_masks(size: int, window: int, stride: int) -> np.ndarray:
    starts = window_starts(size, window, stride)
    pos = np.arange(size)
    return (pos[None, :] >= starts[:, None]) & (pos[None, :] < starts[:, None] + window)


@functools.partial(jax.jit, static_argnames=("fn_static", "kind", "target_fn", "window", "stride", "per_step"))
def _occlusion_jit(fn_arrays, x, target_value, baseline, *, fn_static, kind, target_fn, window, stride,
                   per_step):
    scores_of = scores_fn(combine_callable(fn_arrays, fn_static))
    clean_scores = scores_of(x)
    spec = _fixed_spec(kind, target_value, target_fn, clean_scores)
    y = select_scores(spec, clean_scores).astype(jnp.float32)
    height, width = x.shape[1:3]
    rows = _window_masks(height, window[0], stride[0])  # (nr, H)
    cols = _window_masks(width, window[1], stride[1])  # (nc, W)
    nr, nc = rows.shape[0], cols.shape[0]
    fill = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)

    def occluded_score(row_col):
        row, col = row_col
        inside = row[:, None] & col[None, :]  # (H, W)
        return select_scores(spec, scores_of(jnp.where(inside[None, :, :, None], fill, x))).astype(jnp.float32)

    positions = (jnp.asarray(np.repeat(rows, nc, axis=0)), jnp.asarray(np.tile(cols, (nr, 1))))
    drops = y[None] - _chunked_map(occluded_score, positions, per_step)  # (P, B[, K])
    drops = drops.reshape((nr, nc) + drops.shape[1:])
    r = jnp.asarray(rows, jnp.float32)
    c = jnp.asarray(cols, jnp.float32)
    # A window is the outer product of a row mask and a column mask, so the sum over windows
    # of drop * mask factorises: no (P, H, W) mask tensor.
    total = jnp.einsum("ij...,ih,jw->...hw", drops, r, c, precision=_HIGHEST)
    count = jnp.asarray(np.outer(rows.sum(0), cols.sum(0)), jnp.float32)  # windows covering each pixel
    return safe_divide(total, count)


def _pair(v, name):
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v), int(v))
    try:
        v = tuple(int(i) for i in v)
    except TypeError:
        raise TypeError(f"occlusion: {name} must be an int or a pair (h, w); got {v!r}.") from None
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"occlusion: {name} must be a pair of positive ints (h, w); got {v!r}.")
    return v


def occlusion(fn, x, target: Target = None, *, window: Union[int, Tuple[int, int]] = (16, 16),
              stride: Union[int, Tuple[int, int]] = (8, 8), baseline=0.0, chunk_size: int = 64) -> jax.Array:
    """Sliding-window occlusion: the score drop when a window is replaced by a baseline.

    A ``window = (h, w)`` patch (all channels) slides over the image by ``stride``. For each
    position ``p`` the input is occluded (the patch set to ``baseline``) and::

        drop_p = y^c(x) - y^c(x with patch p := baseline)
        map[i, j] = sum_{p covering (i, j)} drop_p / #{p covering (i, j)}

    the mean drop over the windows that cover each pixel. Positions follow Captum's
    ``Occlusion``: ``ceil((H - h) / stride_h) + 1`` rows of windows starting at
    ``0, stride_h, ...``, the last clipped at the image border (likewise for columns), so every
    pixel is covered when ``stride <= window``; a pixel no window covers gets 0. With a
    full-channel window this equals ``captum.attr.Occlusion(f).attribute(x_nchw,
    sliding_window_shapes=(C, h, w), strides=(1, sh, sw), baselines=baseline)`` at any one
    channel (Captum repeats the value over the channels).

    The maps are raw score differences: no ReLU, no normalisation (positive where occluding
    lowers the score).

    Args:
      fn: any callable ``x -> scores`` (``(B, classes)``, or whatever a callable target takes);
        a :class:`~gradcam_jax.Tap` is used through its scores. Arrays inside ``fn``'s pytree
        (an Equinox module, a tap's parameters) are traced, not baked in.
      x: images ``(B, H, W, C)``.
      target: as in :func:`gradcam_jax.grad_cam`; ``None`` is the top class of the unoccluded
        input. K targets share the occluded passes.
      window: patch size ``(h, w)`` (or an int).
      stride: step ``(sh, sw)`` (or an int).
      baseline: the fill value: a number, or an array broadcastable to ``x`` (a blurred copy,
        a per-channel mean ``(C,)``).
      chunk_size: occluded images per step (rounded down to whole batches, at least one).

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.perturbation import occlusion
      >>> fn = lambda x: jnp.stack([x[..., :4, :4, :].sum((1, 2, 3)), x.sum((1, 2, 3))], -1)
      >>> m = occlusion(fn, jnp.ones((1, 8, 8, 3)), target=0, window=4, stride=4)
      >>> m[0, :2, :2].tolist(), m[0, 6, 6].item()
      ([[48.0, 48.0], [48.0, 48.0]], 0.0)

    References:
      Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014,
      https://arxiv.org/abs/1311.2901 (§4.2); Captum's ``Occlusion``,
      https://captum.ai/api/occlusion.html.
    """
    if not callable(fn):
        raise TypeError(f"occlusion: fn must be a callable x -> scores (or a tap); got {type(fn).__name__}.")
    batch = _batch_size(x)
    check_image_batch(x, "occlusion")
    window = _pair(window, "window")
    stride = _pair(stride, "stride")
    height, width = x.shape[1:3]
    if window[0] > height or window[1] > width:
        raise ValueError(f"occlusion: window {window} does not fit in the {height}x{width} image.")
    spec = target_spec(target, batch)
    arrays, static = partition_callable(fn)
    check_target_against(spec, lambda: jax.eval_shape(scores_fn(fn), x))
    baseline = jnp.asarray(baseline, x.dtype)
    try:
        jnp.broadcast_shapes(baseline.shape, x.shape)
    except ValueError:
        raise ValueError(f"occlusion: baseline of shape {baseline.shape} does not broadcast to the input {x.shape}.") from None
    return _occlusion_jit(
        arrays, x, jit_target_value(spec), baseline,
        fn_static=static, kind=spec.kind, target_fn=jit_target_fn(spec),
        window=window, stride=stride, per_step=_per_step(chunk_size, batch),
    )


#: The perturbation CAMs by name, for :func:`gradcam_jax.cam` (``method="score_cam"``). Each takes
#: ``(tap, x, target, *, chunk_size, upsample, normalize, relu, interpolation, drop_tokens, grid)``.
METHODS = {"score_cam": score_cam, "ablation_cam": ablation_cam}
