"""Target helpers: what to explain for models that are not (only) classifiers.

Each helper returns a callable ``output -> (B,)`` or ``(B, K)`` scores to pass as ``target=`` to
any explainer (:func:`gradcam_jax.grad_cam`, :func:`gradcam_jax.cam`, ...). The callables are
``functools.partial`` objects of functions defined here, with the arrays they need (class
indices, a mask, boxes, a reference embedding) bound as arguments: the engine traces those
arrays, so a new mask, box or reference reuses the compiled program instead of compiling anew.

==================  =========================================  ==============================
helper              model output it expects                    score explained
==================  =========================================  ==============================
``classes(i)``      class logits ``(B, C)``                    ``logits[:, i]``
``binary(sign)``    one logit ``(B,)`` or ``(B, 1)``           ``sign * logit``
``multilabel(i)``   independent label logits ``(B, L)``        ``logits[:, i]`` (pre-sigmoid)
``regression(i)``   regression outputs ``(B,)`` or ``(B, D)``  ``y[:, i]`` (or ``y``)
``segmentation``    per-pixel logits ``(B, H, W, C)``          ``sum_{mask} logits[..., c]``
``box_score``       detections (via ``decode``)                best match's score per box
``similarity(r)``   embeddings ``(B, D)``                      ``cos(e_b, r)``
``token(t, v)``     sequence logits ``(B, T, V)``              ``logits[:, t, v]``
==================  =========================================  ==============================

Scores are taken before any softmax/sigmoid, as Grad-CAM prescribes (Selvaraju et al. 2017,
https://arxiv.org/abs/1610.02391, section 3: ``y^c`` is any differentiable output).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._targets import take_classes

__all__ = [
    "classes",
    "binary",
    "multilabel",
    "regression",
    "segmentation",
    "box_score",
    "similarity",
    "token",
    "box_iou",
    "identity_decode",
]

Indices = int | Sequence[int] | np.ndarray | jax.Array


def _indices(i: Indices, who: str) -> tuple[Any, bool]:
    """Class indices as an int32 array, and whether they are one list for every example (K maps)."""
    if isinstance(i, (bool, np.bool_)):
        raise TypeError(f"{who}: an index must be an int, a list of ints or an int array; got a bool.")
    every = isinstance(i, (list, tuple))
    arr = i if isinstance(i, jax.Array) else np.asarray(i)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{who}: indices must be integers; got dtype {arr.dtype}.")
    if arr.ndim > 2 or (every and arr.ndim != 1):
        raise ValueError(
            f"{who}: give an int, a list of K ints, or an int array (B,) or (B, K); got {arr.shape}."
        )
    if isinstance(arr, np.ndarray):
        if arr.size and arr.min() < 0:
            raise ValueError(f"{who}: index {int(arr.min())} is negative; indices run from 0.")
        arr = arr.astype(np.int32)
    return arr, every


def _pick(idx, every: bool, scores):
    """``scores[b, idx]`` (NaN where out of range) shaped (B,) or (B, K)."""
    b = scores.shape[0]
    if idx.ndim == 0:
        return take_classes(scores, jnp.broadcast_to(idx, (b, 1)))[:, 0]
    if every:
        return take_classes(scores, jnp.broadcast_to(idx, (b,) + idx.shape))
    if idx.shape[0] != b:
        raise ValueError(
            f"the target's indices have shape {tuple(idx.shape)} but the batch has {b} examples: a (B,) "
            f"array gives one index per example; pass a list for the same indices in every example."
        )
    return take_classes(scores, idx[:, None])[:, 0] if idx.ndim == 1 else take_classes(scores, idx)


def _matrix(scores, who: str, expects: str):
    if not hasattr(scores, "ndim") or scores.ndim != 2:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"targets.{who} expects {expects}; the model returned {shape}.")
    return scores


def _class_scores(idx, every, scores):
    return _pick(idx, every, _matrix(scores, "classes", "class logits (B, classes)"))


def classes(i: Indices) -> Callable:
    """The logit of class ``i``: the same as ``target=i``, as a callable (for symmetry).

    Expects class logits ``(B, C)``. ``i``: an int (every example), a list of K ints (K maps per
    example, ``(B, K)``), an int array ``(B,)`` (one class per example) or ``(B, K)``. An index
    out of range gives NaN scores (and NaN maps), never another class.

    >>> import jax.numpy as jnp
    >>> classes([2, 0])(jnp.array([[1.0, 2.0, 3.0]])).tolist()
    [[3.0, 1.0]]
    """
    idx, every = _indices(i, "targets.classes")
    return functools.partial(_class_scores, idx, every)


def _binary_score(sign, scores):
    if not hasattr(scores, "ndim") or not (scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1)):
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(
            f"targets.binary expects one logit per example, (B,) or (B, 1); the model returned {shape}. "
            f"For a two-logit softmax head use targets.classes(1)."
        )
    return sign * scores.reshape(scores.shape[0])


def binary(sign: int = 1) -> Callable:
    """The logit of a single-logit (sigmoid) head: ``+logit`` explains the positive class,
    ``sign=-1`` the negative one (``-logit`` is the logit of ``1 - sigmoid``).

    Expects one logit per example, ``(B,)`` or ``(B, 1)``.

    >>> import jax.numpy as jnp
    >>> binary(-1)(jnp.array([[0.5], [-2.0]])).tolist()
    [-0.5, 2.0]
    """
    if sign not in (1, -1):
        raise ValueError(
            f"targets.binary: sign must be +1 (positive class) or -1 (negative class); got {sign!r}."
        )
    return functools.partial(_binary_score, float(sign))


def _label_scores(idx, every, scores):
    return _pick(idx, every, _matrix(scores, "multilabel", "independent label logits (B, labels)"))


def multilabel(i: Indices) -> Callable:
    """The logit of label ``i`` of a multi-label head (one sigmoid per label).

    Expects label logits ``(B, L)`` (before the sigmoid). ``i`` as in :func:`classes`; a list of
    K labels gives K maps per example — every label present in an image can be explained in one
    forward pass.

    >>> import jax.numpy as jnp
    >>> multilabel([0, 2])(jnp.array([[-1.0, 0.0, 4.0]])).tolist()
    [[-1.0, 4.0]]
    """
    idx, every = _indices(i, "targets.multilabel")
    return functools.partial(_label_scores, idx, every)


def _regression_score(idx, scores):
    if idx is None:
        if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
            return scores.reshape(scores.shape[0])
        raise ValueError(
            f"targets.regression() expects one output per example, (B,) or (B, 1); the model returned "
            f"{tuple(scores.shape)}. Pass regression(i) to explain output i of a (B, D) head."
        )
    return _pick(idx, False, _matrix(scores, "regression", "outputs (B, D)"))


def regression(i: int | None = None) -> Callable:
    """A regression output: the value itself (``i=None``, for ``(B,)`` / ``(B, 1)`` heads) or
    output ``i`` of a ``(B, D)`` head. The gradient of the value says what pushes it up.

    >>> import jax.numpy as jnp
    >>> regression(1)(jnp.array([[0.1, 7.0]])).tolist(), regression()(jnp.array([3.0])).tolist()
    ([7.0], [3.0])
    """
    if i is None:
        return functools.partial(_regression_score, None)
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
        raise ValueError(f"targets.regression: i must be None or an output index >= 0; got {i!r}.")
    return functools.partial(_regression_score, np.int32(i))


def _segmentation_score(mask, class_index, scores):
    if not hasattr(scores, "ndim") or scores.ndim != 4:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(
            f"targets.segmentation expects per-pixel logits (B, H, W, classes), channels last; the model "
            f"returned {shape}. For a channels-first (B, classes, H, W) output, transpose it in the model."
        )
    b, h, w, _ = scores.shape
    if mask.shape[-2:] != (h, w) or (mask.ndim == 3 and mask.shape[0] != b):
        raise ValueError(
            f"targets.segmentation: the mask has shape {tuple(mask.shape)} but the output's pixels are "
            f"({h}, {w}) for {b} examples: give a mask (H, W) = ({h}, {w}) or (B, H, W) = ({b}, {h}, {w}), "
            f"resized to the output's resolution."
        )
    c = jnp.broadcast_to(class_index, (b,))
    n = scores.shape[-1]
    ok = (c >= 0) & (c < n)
    per_pixel = jnp.take_along_axis(scores, jnp.where(ok, c, 0)[:, None, None, None], axis=-1)[..., 0]
    total = jnp.sum(per_pixel * jnp.broadcast_to(mask, (b, h, w)).astype(scores.dtype), axis=(1, 2))
    return jnp.where(ok, total, jnp.nan)


def segmentation(mask, class_index: int | np.ndarray | jax.Array) -> Callable:
    """The logits of class ``class_index`` summed over the pixels of ``mask``.

    ``score_b = sum_{h,w} mask[h, w] * logits[b, h, w, c]`` — why the model labels this region
    ``c`` (the semantic-segmentation target of Vinogradova et al. 2020,
    https://arxiv.org/abs/2002.11434).

    Args:
      mask: ``(H, W)`` or ``(B, H, W)``, bool or float weights, at the output's resolution.
      class_index: an int, or an int array ``(B,)``.

    Returns:
      A callable ``logits (B, H, W, classes) -> (B,)``.

    >>> import jax.numpy as jnp
    >>> logits = jnp.arange(8.0).reshape(1, 2, 2, 2)
    >>> segmentation(jnp.array([[1, 0], [0, 1]]), 1)(logits).tolist()
    [8.0]
    """
    mask = mask if isinstance(mask, jax.Array) else np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(
            f"targets.segmentation: the mask must be (H, W) or (B, H, W); got shape {mask.shape}."
        )
    idx, _ = _indices(class_index, "targets.segmentation")
    if idx.ndim > 1:
        raise ValueError("targets.segmentation: class_index must be an int or an int array (B,).")
    return functools.partial(_segmentation_score, mask, idx)


def box_iou(a, b):
    """Intersection over union of boxes ``(..., N, 4)`` and ``(..., M, 4)`` -> ``(..., N, M)``.

    Boxes are corners ``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2``.

    >>> import jax.numpy as jnp
    >>> box_iou(jnp.array([[0.0, 0, 2, 2]]), jnp.array([[0.0, 0, 2, 1], [5.0, 5, 6, 6]])).tolist()
    [[0.5, 0.0]]
    """
    a, b = a[..., :, None, :], b[..., None, :, :]
    iw = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
    ih = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def identity_decode(output):
    """The default ``decode`` of :func:`box_score`: the model already returns
    ``(boxes (B, M, 4), scores (B, M), labels (B, M))``."""
    return output


def _check_detections(boxes, scores, labels):
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2]:
        raise ValueError(
            f"targets.box_score: decode must return boxes (B, M, 4) and scores (B, M) (and labels (B, M) or "
            f"None); got boxes {tuple(boxes.shape)} and scores {tuple(scores.shape)}."
        )
    if labels is not None and labels.shape != scores.shape:
        raise ValueError(
            f"targets.box_score: labels {tuple(labels.shape)} must match scores {tuple(scores.shape)}."
        )


def _box_scores(ref_boxes, ref_labels, iou_threshold, per_box, decode, output):
    boxes, scores, labels = decode(output)
    _check_detections(boxes, scores, labels)
    b = scores.shape[0]
    ref = jnp.broadcast_to(ref_boxes, (b,) + ref_boxes.shape[-2:]).astype(boxes.dtype)
    iou = jax.lax.stop_gradient(box_iou(ref, boxes))  # (B, N, M): which detection, not how much
    if ref_labels is not None and labels is not None:
        wanted = jnp.broadcast_to(ref_labels, (b, ref.shape[1]))
        iou = jnp.where(wanted[:, :, None] == labels[:, None, :], iou, -1.0)
    best = jnp.max(iou, axis=-1, keepdims=True)  # (B, N, 1)
    # Ties in IoU go to the higher-scoring detection, then to the first.
    tie_score = jnp.where(iou == best, jax.lax.stop_gradient(scores)[:, None, :], -jnp.inf)
    pick = jnp.argmax(tie_score, axis=-1)  # (B, N)
    picked = jnp.take_along_axis(scores, pick, axis=-1)  # (B, N)
    matched = best[..., 0] >= iou_threshold
    out = jnp.where(matched, picked, jnp.zeros_like(picked))
    return out if per_box else jnp.sum(out, axis=-1)


def box_score(
    boxes,
    labels=None,
    *,
    iou_threshold: float = 0.5,
    decode: Callable = identity_decode,
    per_box: bool = False,
) -> Callable:
    """For each reference box, the score of the detection that matches it best.

    A detection matches reference box ``n`` when its label equals ``labels[n]`` (any label when
    ``labels`` is None) and its IoU with the box is at least ``iou_threshold``; the best match
    is the one with the largest IoU (ties: the higher score, then the first). A box with no
    match scores 0 (its map is zero). The choice of detection is not differentiated; the
    matched score is. This is the box-score target of pytorch-grad-cam's Faster R-CNN tutorial
    (there IoU is added to the score; here the score alone is explained).

    Args:
      boxes: reference boxes ``(N, 4)`` or ``(B, N, 4)``, corners ``(x1, y1, x2, y2)`` in the
        coordinates ``decode`` returns.
      labels: the class of each box, ``(N,)`` or ``(B, N)`` ints, or None.
      iou_threshold: the least IoU of a match.
      decode: ``output -> (boxes (B, M, 4), scores (B, M), labels (B, M) or None)``: turns the
        model's raw output into its detections (a module-level function or a stable lambda; it is
        part of the compiled program). Default: the output is that triple already.
      per_box: return ``(B, N)`` (one map per reference box) instead of their sum ``(B,)``.

    >>> import jax.numpy as jnp
    >>> dets = (jnp.array([[[0.0, 0, 10, 10], [1.0, 1, 10, 10]]]), jnp.array([[0.75, 0.5]]), None)
    >>> box_score(jnp.array([[1.0, 1, 10, 10]]))(dets).tolist()
    [0.5]
    """
    boxes = boxes if isinstance(boxes, jax.Array) else np.asarray(boxes, np.float32)
    if boxes.ndim not in (2, 3) or boxes.shape[-1] != 4:
        raise ValueError(
            f"targets.box_score: boxes must be (N, 4) or (B, N, 4) corners; got shape {boxes.shape}."
        )
    if labels is not None:
        labels, _ = _indices(labels, "targets.box_score")
        if labels.shape != boxes.shape[:-1] and labels.shape != boxes.shape[-2:-1]:
            raise ValueError(
                f"targets.box_score: labels {labels.shape} must be one per box, {boxes.shape[:-1]}."
            )
    if not callable(decode):
        raise TypeError("targets.box_score: decode must be a callable output -> (boxes, scores, labels).")
    threshold = np.float32(iou_threshold)
    return functools.partial(_box_scores, boxes, labels, threshold, bool(per_box), decode)


def _similarity_score(reference, output):
    if not hasattr(output, "ndim") or output.ndim != 2 or output.shape[-1] != reference.shape[-1]:
        shape = getattr(output, "shape", type(output).__name__)
        raise ValueError(
            f"targets.similarity expects embeddings (B, {reference.shape[-1]}) (the reference's size); the "
            f"model returned {shape}."
        )
    e = output / jnp.maximum(jnp.linalg.norm(output, axis=-1, keepdims=True), 1e-12)
    r = reference / jnp.maximum(jnp.linalg.norm(reference, axis=-1, keepdims=True), 1e-12)
    return e @ r.T.astype(e.dtype)


def similarity(reference) -> Callable:
    """Cosine similarity of the model's embedding to a reference embedding.

    ``score_b = <e_b, r> / (|e_b| |r|)``. With ``reference`` ``(D,)`` the scores are ``(B,)``;
    with K references ``(K, D)`` (e.g. K text prompts embedded by CLIP's text tower, explaining
    an image tower) they are ``(B, K)``: one map per reference, one forward pass.

    >>> import jax.numpy as jnp
    >>> similarity(jnp.array([1.0, 0.0]))(jnp.array([[2.0, 0.0], [0.0, 3.0]])).tolist()
    [1.0, 0.0]
    """
    reference = reference if isinstance(reference, jax.Array) else np.asarray(reference, np.float32)
    if reference.ndim not in (1, 2):
        raise ValueError(
            f"targets.similarity: the reference must be (D,) or (K, D); got shape {reference.shape}."
        )
    return functools.partial(_similarity_score, reference)


def _token_score(position, vocab_id, output):
    if not hasattr(output, "ndim") or output.ndim != 3:
        shape = getattr(output, "shape", type(output).__name__)
        raise ValueError(f"targets.token expects sequence logits (B, T, vocab); the model returned {shape}.")
    b, t, _ = output.shape
    pos = jnp.broadcast_to(position, (b,))
    ok = (pos >= 0) & (pos < t)
    rows = jnp.take_along_axis(output, jnp.where(ok, pos, 0)[:, None, None], axis=1)[:, 0]  # (B, V)
    score = take_classes(rows, jnp.broadcast_to(vocab_id, (b,))[:, None])[:, 0]
    return jnp.where(ok, score, jnp.nan)


def token(position: int | np.ndarray | jax.Array, vocab_id: int | np.ndarray | jax.Array) -> Callable:
    """The logit of token ``vocab_id`` at sequence position ``position``.

    Expects sequence logits ``(B, T, V)`` (a language model's, a captioner's). Each argument is an
    int or an int array ``(B,)``. Out-of-range positions or ids give NaN.

    >>> import jax.numpy as jnp
    >>> token(1, 2)(jnp.arange(12.0).reshape(1, 2, 6)).tolist()
    [8.0]
    """
    pos, _ = _indices(position, "targets.token")
    vid, _ = _indices(vocab_id, "targets.token")
    if pos.ndim > 1 or vid.ndim > 1:
        raise ValueError("targets.token: position and vocab_id must be ints or int arrays (B,).")
    return functools.partial(_token_score, pos, vid)
