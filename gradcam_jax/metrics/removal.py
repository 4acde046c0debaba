"""Does the model need what the map points at? Deletion / insertion and confidence drop.

Each metric perturbs the inputs according to the maps and reads the model's confidence in the
explained class. All perturbed inputs of all steps are built on device, inside the loop that
evaluates them, ``chunk_size`` inputs per forward pass (see
``gradcam_jax._chunking.map_in_chunks``), so nothing of size ``steps x B x H x W x C`` is
ever materialised and the model is compiled once.

Common arguments:

- ``fn``: the model, any JAX callable ``images -> scores (B, classes)`` (a Flax ``apply``
  closure, an Equinox model, a :class:`~gradcam_jax.Tap`, whose scores are used). Array leaves
  of a pytree ``fn`` are jit arguments; pass the same function object to reuse compilation.
- ``images``: the model's input (already preprocessed): images ``(B, H, W, C)``, signals
  ``(B, T, C)``, volumes or videos ``(B, D, H, W, C)``; channels-first with ``layout=``
  (``"NCHW"``, ``"NCL"``, ``"NCDHW"``; a batch that looks channels-first is refused without
  it); or a pytree (a dict, a tuple for a two-input model) whose image ``input=`` picks (a key,
  an index or a callable; by default the only floating leaf of rank >= 3). The other leaves
  of a pytree go with each example unchanged. As in :func:`gradcam_jax.cam`.
- ``maps``: ``(B, *spatial)`` — ``(B, H, W)``, ``(B, T)``, ``(B, D, H, W)`` — at the image's
  resolution (collapse per-channel attributions with :func:`pixel_saliency`). An example whose
  map holds a NaN, or whose explained score is NaN, gets NaN results (never a number that
  reads as evidence); :class:`~gradcam_jax.metrics.Report` counts them.
- Batches: a batch of 0 examples is refused with a ``ValueError``, as by the explainers.
- ``target``: ``None`` (each example's top class on the unperturbed input), an int, or an
  int array ``(B,)``.
- ``softmax``: read the class probability (``softmax`` of the scores; what every paper here
  uses) or, with ``False``, the raw score ``fn`` returns.
- ``layout``, ``input``: where the image is and how its axes are ordered (see ``images``).

Saliency order: positions (pixels, time steps, voxels) sorted from most to least salient, ties
broken by row-major index (:func:`saliency_order`); a position is removed with all its channels.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._callables import PytreeCallable, as_pytree
from .._chunking import map_in_chunks
from .._inputs import image_of, with_image
from .._layout import Layout
from .._maps import kernel
from .._tap import scores_fn
from ._blur import gaussian_blur
from ._common import (
    RemovalOptions,
    broadcast_fill,
    check_fn,
    check_inputs,
    check_maps,
    check_positive_int,
    class_scores,
    examples,
    map_shape,
    nan_examples,
    prepare_target,
    resolve_target,
)
from ._saliency import removal_counts, saliency_ranks, trapezoid

__all__ = ["Curve", "deletion", "insertion", "ConfidenceChange", "confidence_change"]


class Curve(NamedTuple):
    """A removal curve per example.

    ``auc (B,)``: area under the curve over the fraction of positions changed in [0, 1]
    (trapezoidal rule); ``scores (B, n_steps + 1)``: the class probability after each step;
    ``fractions (n_steps + 1,)``: the fraction of positions changed at each step.
    """

    auc: jax.Array
    scores: jax.Array
    fractions: jax.Array


@kernel
def curve_kernel(model: PytreeCallable, x, start, fill, maps, target, *, options: RemovalOptions):
    """Scores of ``x`` with its image ``where(rank < cut_k, fill, start)``, k = 0 .. n_steps.

    ``x``: the clean input (its top class is the target when ``target`` is None; its other
    leaves go with each example); ``start``, ``fill``: channels-last images ``(B, *spatial, C)``.
    """
    chunk, softmax, n_steps, view = options.chunk, options.softmax, options.n_steps, options.view
    fn = scores_fn(model.fn)
    b, n = maps.shape[0], math.prod(maps.shape[1:])
    target = resolve_target(fn, x, target, chunk, b)
    ranks = saliency_ranks(maps)  # (B, *spatial)
    cuts = jnp.asarray(removal_counts(n, n_steps), jnp.int32)  # (n_steps + 1,)
    spatial = tuple(range(1, maps.ndim))

    def batch(idx):  # idx = step * B + example
        step, img = idx // b, idx % b
        changed = (ranks[img] < jnp.expand_dims(cuts[step], spatial))[..., None]
        image = jnp.where(changed, fill[img], start[img])
        return class_scores(fn(with_image(examples(x, img), view, image)), target[img], softmax)

    scores = map_in_chunks(batch, (n_steps + 1) * b, chunk).reshape(n_steps + 1, b).T
    # A NaN map has no order to remove positions in: its curve is NaN, not some curve.
    scores = jnp.where(nan_examples(maps)[:, None], jnp.nan, scores)
    fractions = cuts.astype(jnp.float32) / n
    return Curve(trapezoid(scores, fractions), scores, fractions)


def _curve(who, fn, x, view, maps, target, start, fill, n_steps, chunk_size, softmax):
    """Step k shows ``fill`` where a position's saliency rank < cut_k and ``start`` elsewhere."""
    check_fn(fn, who)
    check_maps(maps, x, view, who)
    n_steps = check_positive_int(n_steps, "n_steps", who)
    chunk = check_positive_int(chunk_size, "chunk_size", who)
    target = prepare_target(fn, x, map_shape(x, view)[0], target, who)
    options = RemovalOptions(chunk, bool(softmax), n_steps=n_steps, view=view)
    return curve_kernel(as_pytree(fn), x, start, fill, maps, target, options=options)


def deletion(
    fn,
    images,
    maps,
    target=None,
    *,
    n_steps: int = 50,
    baseline=0.0,
    chunk_size: int = 64,
    softmax: bool = True,
    layout: str | Layout | None = None,
    input: Any = None,
) -> Curve:
    """Deletion (Petsiuk et al. 2018): remove the most salient positions first; lower AUC is better.

    Step ``k = 0 .. n_steps`` replaces the ``floor(k * N / n_steps)`` most salient of the ``N``
    positions (``H * W`` pixels, ``T`` time steps, ``D * H * W`` voxels; saliency order, ties
    by row-major index) by ``baseline`` and records ``p_c``, the probability of the explained
    class. The metric is the area under ``p_c`` against the fraction of positions removed, by
    the trapezoidal rule over [0, 1]. A good explanation makes the probability collapse early:
    a small AUC.

    All ``(n_steps + 1) * B`` inputs are evaluated in ``lax.map`` over chunks of ``chunk_size``
    inputs, each built on the fly from the example, its position ranks and the step.

    Args:
      fn, images, maps, target, softmax, layout, input: see the module docstring.
      n_steps: the number of removal steps (RISE removes 224 pixels per step at 224 x 224).
      baseline: what removed positions become: a number or an array broadcastable to the image
        in its own layout (default 0: black for ``[0, 1]`` inputs, the mean colour for
        mean-subtracted ones).
      chunk_size: inputs per forward pass (memory; not the result).

    Returns:
      a :class:`Curve`: ``auc (B,)``, ``scores (B, n_steps + 1)``, ``fractions``.

    References:
      Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
      Models", BMVC 2018, §4.1, https://arxiv.org/abs/1806.07421 (ResNet-50, ImageNet: Grad-CAM
      deletion 0.123, insertion 0.677).
    """
    view = check_inputs(images, layout, input, "deletion")
    fill = broadcast_fill(baseline, images, view, "deletion")
    start = image_of(images, view)
    return _curve("deletion", fn, images, view, maps, target, start, fill, n_steps, chunk_size, softmax)


def insertion(
    fn,
    images,
    maps,
    target=None,
    *,
    n_steps: int = 50,
    blur_sigma: float = 5.0,
    canvas=None,
    chunk_size: int = 64,
    softmax: bool = True,
    layout: str | Layout | None = None,
    input: Any = None,
) -> Curve:
    """Insertion (Petsiuk et al. 2018): reveal the most salient positions first; higher AUC is better.

    Start from a blurred copy of each example (the *canvas*) and, at step ``k``, put back the
    ``floor(k * N / n_steps)`` most salient of its ``N`` positions; the metric is the area
    under the explained class's probability against the fraction of positions inserted
    (trapezoidal rule over [0, 1]). The canvas is a Gaussian blur of the image along every
    spatial axis (both axes of an image, the time axis of a signal, the three axes of a
    volume) with standard deviation ``blur_sigma`` positions (default 5, kernel truncated at
    4 sigma, mirrored borders: :func:`gaussian_blur`) — a canvas that removes the object's
    detail without introducing the sharp edges of a constant fill; RISE's own code blurs with
    an 11 x 11 kernel of sigma 5.

    Args:
      fn, images, maps, target, softmax, layout, input: see the module docstring.
      n_steps: the number of insertion steps.
      blur_sigma: the canvas blur in positions (ignored when ``canvas`` is given).
      canvas: an explicit starting image, broadcastable to the image in its own layout (e.g.
        ``0.0``).
      chunk_size: inputs per forward pass.

    Returns:
      a :class:`Curve`.

    References:
      Petsiuk, Das & Saenko, RISE, BMVC 2018, §4.1, https://arxiv.org/abs/1806.07421.
    """
    view = check_inputs(images, layout, input, "insertion")
    image = image_of(images, view)
    if canvas is None:
        start = gaussian_blur(image, float(blur_sigma))  # channels-last, every spatial axis
    else:
        start = broadcast_fill(canvas, images, view, "insertion")
    # Step k shows the image where a position's rank < cut_k and the canvas elsewhere.
    return _curve("insertion", fn, images, view, maps, target, start, image, n_steps, chunk_size, softmax)


# --------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence
# --------------------------------------------------------------------------------------------


class ConfidenceChange(NamedTuple):
    """Per-image results of :func:`confidence_change`.

    ``drop (B,)``: ``max(0, Y - O) / Y * 100`` (its mean is the Average Drop %), NaN when
    ``Y`` or ``O`` is NaN (a NaN score, or a NaN map: ``O`` is then NaN too);
    ``increase (B,)`` bool: ``O > Y`` (its mean x 100 is the Increase in Confidence %), false
    for those NaN examples (:func:`~gradcam_jax.metrics.evaluate` reports them as NaN);
    ``clean (B,)``: ``Y``, the class probability on the image; ``masked (B,)``: ``O``, on the
    explanation-masked image.
    """

    drop: jax.Array
    increase: jax.Array
    clean: jax.Array
    masked: jax.Array


@kernel
def confidence_kernel(model: PytreeCallable, x, maps, baseline, target, *, options: RemovalOptions):
    chunk, softmax, view = options.chunk, options.softmax, options.view
    fn = scores_fn(model.fn)
    image = image_of(x, view)  # (B, *spatial, C)
    b = image.shape[0]
    target = resolve_target(fn, x, target, chunk, b)
    m = maps.astype(image.dtype)[..., None]

    def batch(idx):  # idx < B: clean example; idx >= B: masked example
        img = idx % b
        masked = baseline[img] + m[img] * (image[img] - baseline[img])
        second = (idx >= b).reshape((-1,) + (1,) * (image.ndim - 1))
        xi = jnp.where(second, masked, image[img])
        return class_scores(fn(with_image(examples(x, img), view, xi)), target[img], softmax)

    s = map_in_chunks(batch, 2 * b, chunk)
    y, o = s[:b], jnp.where(nan_examples(maps), jnp.nan, s[b:])
    drop = jnp.where(y > 0, jnp.maximum(y - o, 0.0) / jnp.where(y > 0, y, 1.0), 0.0) * 100.0
    # A NaN score or map is no evidence either way: NaN, never a 0% drop.
    drop = jnp.where(jnp.isnan(y) | jnp.isnan(o), jnp.nan, drop)
    return ConfidenceChange(drop, o > y, y, o)


def confidence_change(
    fn,
    images,
    maps,
    target=None,
    *,
    baseline=0.0,
    chunk_size: int = 64,
    softmax: bool = True,
    layout: str | Layout | None = None,
    input: Any = None,
) -> ConfidenceChange:
    """Average Drop % and Increase in Confidence % (Chattopadhay et al. 2018).

    With ``Y`` the explained class's probability on the input and ``O`` on the
    explanation-masked input ``L ⊙ I`` (each position scaled by the map's value there, all its
    channels alike)::

        drop_i     = max(0, Y_i - O_i) / Y_i * 100          Average Drop %  = mean_i drop_i
        increase_i = [O_i > Y_i]                            Increase in Confidence % = 100 * mean_i

    Lower Average Drop and higher Increase are better. The maps must be in [0, 1] (normalised,
    as :func:`gradcam_jax.grad_cam` returns them): they are used as a multiplicative mask.
    The masked image is ``baseline + L * (I - baseline)``; the default ``baseline = 0`` is
    exactly ``L ⊙ I`` in the model's input space (for mean-subtracted inputs, masked pixels
    fade to the mean colour).

    Args:
      fn, images, maps, target, softmax, layout, input: see the module docstring.
      baseline: the image that a zero map value shows; a number or an array broadcastable to
        the image in its own layout.
      chunk_size: inputs per forward pass.

    Returns:
      a :class:`ConfidenceChange` of per-example arrays.

    References:
      Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep
      Convolutional Networks", WACV 2018, §5.1, https://arxiv.org/abs/1710.11063 (VGG-16,
      ImageNet val: Grad-CAM 46.56 / 13.42, Grad-CAM++ 36.84 / 17.05).
    """
    who = "confidence_change"
    check_fn(fn, who)
    view = check_inputs(images, layout, input, who)
    check_maps(maps, images, view, who)
    chunk = check_positive_int(chunk_size, "chunk_size", who)
    target = prepare_target(fn, images, map_shape(images, view)[0], target, who)
    fill = broadcast_fill(baseline, images, view, who)
    options = RemovalOptions(chunk, bool(softmax), view=view)
    return confidence_kernel(as_pytree(fn), images, maps, fill, target, options=options)
