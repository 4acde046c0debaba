"""Does the model need what the map points at? Deletion / insertion and confidence drop.

Each metric perturbs the images according to the maps and reads the model's confidence in the
explained class. All perturbed images of all steps are built on device, inside the loop that
evaluates them, ``chunk_size`` images per forward pass (see
``gradcam_jax._chunking.map_in_chunks``), so nothing of size ``steps x B x H x W x C`` is
ever materialised and the model is compiled once.

Common arguments:

- ``fn``: the model, any JAX callable ``images -> scores (B, classes)`` (a Flax ``apply``
  closure, an Equinox model, a :class:`~gradcam_jax.Tap`, whose scores are used). Array leaves
  of a pytree ``fn`` are jit arguments; pass the same function object to reuse compilation.
- ``images``: the model's input ``(B, H, W, C)`` (already preprocessed).
- ``maps``: ``(B, H, W)`` at the images' resolution (collapse per-channel attributions with
  :func:`pixel_saliency`).
- ``target``: ``None`` (each image's top class on the unperturbed image), an int, or an int
  array ``(B,)``.
- ``softmax``: read the class probability (``softmax`` of the scores; what every paper here
  uses) or, with ``False``, the raw score ``fn`` returns.

Saliency order: pixels sorted from most to least salient, ties broken by row-major index
(:func:`saliency_order`); a pixel is removed with all its channels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._callables import PytreeCallable, as_pytree
from .._chunking import map_in_chunks
from .._maps import check_image_batch, kernel
from .._tap import scores_fn
from ._common import (
    RemovalOptions,
    check_fn,
    check_maps,
    check_positive_int,
    class_scores,
    gaussian_blur,
    prepare_target,
    removal_counts,
    resolve_target,
    saliency_ranks,
    trapezoid,
)

__all__ = ["Curve", "deletion", "insertion", "ConfidenceChange", "confidence_change"]


class Curve(NamedTuple):
    """A removal curve per image.

    ``auc (B,)``: area under the curve over the fraction of pixels changed in [0, 1]
    (trapezoidal rule); ``scores (B, n_steps + 1)``: the class probability after each step;
    ``fractions (n_steps + 1,)``: the fraction of pixels changed at each step.
    """

    auc: jax.Array
    scores: jax.Array
    fractions: jax.Array


def _broadcast_fill(value, images, who):
    v = jnp.asarray(value, images.dtype)
    try:
        return jnp.broadcast_to(v, images.shape)
    except ValueError:
        raise ValueError(
            f"{who}: the fill of shape {v.shape} does not broadcast to the images {images.shape}."
        ) from None


@kernel
def curve_kernel(model: PytreeCallable, images, fill, clean, maps, target, *, options: RemovalOptions):
    """Scores of ``where(rank < cut_k, fill, images)`` for k = 0 .. n_steps, every image.

    ``clean``: the unperturbed images, whose top class is the target when ``target`` is None.
    """
    chunk, softmax, n_steps = options.chunk, options.softmax, options.n_steps
    fn = scores_fn(model.fn)
    b, h, w, _ = images.shape
    target = resolve_target(fn, clean, target, chunk)
    ranks = saliency_ranks(maps)  # (B, H, W)
    cuts = jnp.asarray(removal_counts(h * w, n_steps), jnp.int32)  # (n_steps + 1,)

    def batch(idx):  # idx = step * B + image
        step, img = idx // b, idx % b
        changed = (ranks[img] < cuts[step][:, None, None])[..., None]
        x = jnp.where(changed, fill[img], images[img])
        return class_scores(fn(x), target[img], softmax)

    scores = map_in_chunks(batch, (n_steps + 1) * b, chunk).reshape(n_steps + 1, b).T
    fractions = cuts.astype(jnp.float32) / (h * w)
    return Curve(trapezoid(scores, fractions), scores, fractions)


def _curve(who, fn, images, maps, target, start, fill, n_steps, chunk_size, softmax):
    """Step k shows ``fill`` where a pixel's saliency rank < cut_k and ``start`` elsewhere."""
    check_fn(fn, who)
    check_maps(maps, images, who)
    n_steps = check_positive_int(n_steps, "n_steps", who)
    chunk = check_positive_int(chunk_size, "chunk_size", who)
    target = prepare_target(fn, images, target, who)
    options = RemovalOptions(chunk, bool(softmax), n_steps=n_steps)
    return curve_kernel(as_pytree(fn), start, fill, images, maps, target, options=options)


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
) -> Curve:
    """Deletion (Petsiuk et al. 2018): remove the most salient pixels first; lower AUC is better.

    Step ``k = 0 .. n_steps`` replaces the ``floor(k * H * W / n_steps)`` most salient pixels
    (saliency order, ties by row-major index) by ``baseline`` and records ``p_c``, the
    probability of the explained class. The metric is the area under ``p_c`` against the
    fraction of pixels removed, by the trapezoidal rule over [0, 1]. A good explanation makes
    the probability collapse early: a small AUC.

    All ``(n_steps + 1) * B`` images are evaluated in ``lax.map`` over chunks of ``chunk_size``
    images, each built on the fly from the image, its pixel ranks and the step.

    Args:
      fn, images, maps, target, softmax: see the module docstring.
      n_steps: the number of removal steps (RISE removes 224 pixels per step at 224 x 224).
      baseline: what removed pixels become: a number or an array broadcastable to the images
        (default 0: black for ``[0, 1]`` inputs, the mean colour for mean-subtracted ones).
      chunk_size: images per forward pass (memory; not the result).

    Returns:
      a :class:`Curve`: ``auc (B,)``, ``scores (B, n_steps + 1)``, ``fractions``.

    References:
      Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
      Models", BMVC 2018, §4.1, https://arxiv.org/abs/1806.07421 (ResNet-50, ImageNet: Grad-CAM
      deletion 0.123, insertion 0.677).
    """
    check_image_batch(images, "deletion")
    fill = _broadcast_fill(baseline, images, "deletion")
    return _curve("deletion", fn, images, maps, target, images, fill, n_steps, chunk_size, softmax)


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
) -> Curve:
    """Insertion (Petsiuk et al. 2018): reveal the most salient pixels first; higher AUC is better.

    Start from a blurred copy of each image (the *canvas*) and, at step ``k``, put back the
    ``floor(k * H * W / n_steps)`` most salient pixels of the original; the metric is the area
    under the explained class's probability against the fraction of pixels inserted
    (trapezoidal rule over [0, 1]). The canvas is a Gaussian blur of the image with standard
    deviation ``blur_sigma`` pixels (default 5, kernel truncated at 4 sigma, mirrored borders:
    :func:`gaussian_blur`) — a canvas that removes the object's detail without introducing
    the sharp edges of a constant fill; RISE's own code blurs with an 11 x 11 kernel of sigma 5.

    Args:
      fn, images, maps, target, softmax: see the module docstring.
      n_steps: the number of insertion steps.
      blur_sigma: the canvas blur in pixels (ignored when ``canvas`` is given).
      canvas: an explicit starting image, broadcastable to ``images`` (e.g. ``0.0``).
      chunk_size: images per forward pass.

    Returns:
      a :class:`Curve`.

    References:
      Petsiuk, Das & Saenko, RISE, BMVC 2018, §4.1, https://arxiv.org/abs/1806.07421.
    """
    check_image_batch(images, "insertion")
    if canvas is None:
        canvas = gaussian_blur(images, float(blur_sigma))
    canvas = _broadcast_fill(canvas, images, "insertion")
    # Step k shows the image where a pixel's rank < cut_k and the canvas elsewhere.
    return _curve("insertion", fn, images, maps, target, canvas, images, n_steps, chunk_size, softmax)


# --------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence
# --------------------------------------------------------------------------------------------


class ConfidenceChange(NamedTuple):
    """Per-image results of :func:`confidence_change`.

    ``drop (B,)``: ``max(0, Y - O) / Y * 100`` (its mean is the Average Drop %);
    ``increase (B,)`` bool: ``O > Y`` (its mean x 100 is the Increase in Confidence %);
    ``clean (B,)``: ``Y``, the class probability on the image; ``masked (B,)``: ``O``, on the
    explanation-masked image.
    """

    drop: jax.Array
    increase: jax.Array
    clean: jax.Array
    masked: jax.Array


@kernel
def confidence_kernel(model: PytreeCallable, images, maps, baseline, target, *, options: RemovalOptions):
    chunk, softmax = options.chunk, options.softmax
    fn = scores_fn(model.fn)
    b = images.shape[0]
    target = resolve_target(fn, images, target, chunk)
    m = maps.astype(images.dtype)[..., None]

    def batch(idx):  # idx < B: clean image; idx >= B: masked image
        img = idx % b
        masked = baseline[img] + m[img] * (images[img] - baseline[img])
        x = jnp.where((idx >= b)[:, None, None, None], masked, images[img])
        return class_scores(fn(x), target[img], softmax)

    s = map_in_chunks(batch, 2 * b, chunk)
    y, o = s[:b], s[b:]
    drop = jnp.where(y > 0, jnp.maximum(y - o, 0.0) / jnp.where(y > 0, y, 1.0), 0.0) * 100.0
    return ConfidenceChange(drop, o > y, y, o)


def confidence_change(
    fn, images, maps, target=None, *, baseline=0.0, chunk_size: int = 64, softmax: bool = True
) -> ConfidenceChange:
    """Average Drop % and Increase in Confidence % (Chattopadhay et al. 2018).

    With ``Y`` the explained class's probability on the image and ``O`` on the
    explanation-masked image ``L ⊙ I`` (each pixel scaled by the map's value there)::

        drop_i     = max(0, Y_i - O_i) / Y_i * 100          Average Drop %  = mean_i drop_i
        increase_i = [O_i > Y_i]                            Increase in Confidence % = 100 * mean_i

    Lower Average Drop and higher Increase are better. The maps must be in [0, 1] (normalised,
    as :func:`gradcam_jax.grad_cam` returns them): they are used as a multiplicative mask.
    The masked image is ``baseline + L * (I - baseline)``; the default ``baseline = 0`` is
    exactly ``L ⊙ I`` in the model's input space (for mean-subtracted inputs, masked pixels
    fade to the mean colour).

    Args:
      fn, images, maps, target, softmax: see the module docstring.
      baseline: the image that a zero map value shows; a number or an array broadcastable to
        the images.
      chunk_size: images per forward pass.

    Returns:
      a :class:`ConfidenceChange` of per-image arrays.

    References:
      Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep
      Convolutional Networks", WACV 2018, §5.1, https://arxiv.org/abs/1710.11063 (VGG-16,
      ImageNet val: Grad-CAM 46.56 / 13.42, Grad-CAM++ 36.84 / 17.05).
    """
    who = "confidence_change"
    check_fn(fn, who)
    check_image_batch(images, who)
    check_maps(maps, images, who)
    chunk = check_positive_int(chunk_size, "chunk_size", who)
    target = prepare_target(fn, images, target, who)
    fill = _broadcast_fill(baseline, images, who)
    options = RemovalOptions(chunk, bool(softmax))
    return confidence_kernel(as_pytree(fn), images, maps, fill, target, options=options)
