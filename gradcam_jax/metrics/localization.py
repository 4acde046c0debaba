"""Where does a map point? Weakly-supervised localisation boxes (the pointing game is in
:mod:`gradcam_jax.metrics.pointing`).

Boxes everywhere here are ``(y0, x0, y1, x1)`` **inclusive** pixel indices (row of the top
edge, column of the left edge, row of the bottom edge, column of the right edge), int32. A box
covers ``(y1 - y0 + 1) * (x1 - x0 + 1)`` pixels; the empty box is ``(0, 0, -1, -1)``.

The boxes, their IoU and the connected components they come from are 2-D (the ILSVRC protocol
of Grad-CAM §4.1 is defined on images): signal maps ``(B, T)``, volume maps ``(B, D, H, W)``
and boxes of other than 4 numbers are refused with a message.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._common import check_map_batch

__all__ = [
    "EMPTY_BOX",
    "connected_components",
    "largest_component",
    "localization_box",
    "box_iou",
    "boxes_to_masks",
    "localization_correct",
    "Localization",
    "localization_errors",
]

EMPTY_BOX = (0, 0, -1, -1)

_OFFSETS = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


def _check_connectivity(connectivity) -> int:
    if connectivity not in (4, 8):
        raise ValueError(
            f"connectivity must be 4 (edge neighbours) or 8 (edges and corners); got {connectivity!r}."
        )
    return int(connectivity)


def _check_2d(mask, who: str):
    if mask.ndim < 2:
        raise ValueError(
            f"{who}: masks must be 2-D, (..., H, W) (connected components here are those of an image); "
            f"got shape {mask.shape}."
        )
    return mask


def _labels_one(fg, connectivity: int):
    """Min-index labels of one boolean image ``(H, W)``; background gets ``H * W``."""
    h, w = fg.shape
    n = h * w
    idx = jnp.arange(n, dtype=jnp.int32).reshape(h, w)
    lab0 = jnp.where(fg, idx, n)
    offsets = _OFFSETS[connectivity]

    def neighbour_min(lab):
        p = jnp.pad(lab, 1, constant_values=n)
        m = lab
        for dy, dx in offsets:
            m = jnp.minimum(m, p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
        return jnp.where(fg, m, n)

    def jump(lab):
        # Pointer jumping: a label is the index of a pixel of the same component with a smaller
        # or equal index, so label[label[p]] is a valid, smaller-or-equal label for p.
        flat = jnp.concatenate([lab.reshape(-1), jnp.full((1,), n, jnp.int32)])
        return flat[lab.reshape(-1)].reshape(h, w)

    def body(state):
        lab, _ = state
        new = jump(jump(neighbour_min(lab)))
        return new, jnp.any(new != lab)

    lab, _ = jax.lax.while_loop(lambda s: s[1], body, (lab0, jnp.array(True)))
    return lab


@functools.partial(jax.jit, static_argnames=("connectivity",))
def connected_components(mask, connectivity: int = 8):
    """Connected components of boolean masks ``(..., H, W)``, under ``jit``.

    Each foreground pixel is labelled with the smallest row-major index ``y * W + x`` of its
    component; background pixels get ``H * W``. Computed by iterative min-label flooding: every
    foreground pixel takes the minimum label of itself and its foreground neighbours (4 edge
    neighbours for ``connectivity=4``, also the 4 diagonal ones for ``connectivity=8``),
    followed by two pointer-jumping steps (``label[p] <- label[label[p]]``, which shortcuts
    long chains), in a ``lax.while_loop`` until no label changes. The partition equals
    ``scipy.ndimage.label(mask, structure)`` with ``structure =
    scipy.ndimage.generate_binary_structure(2, 1)`` for 4-connectivity and ``(2, 2)`` for
    8-connectivity (only the numbering differs: SciPy numbers components 1, 2, ... in the
    row-major order of their first pixel, which is the order of these labels).
    """
    connectivity = _check_connectivity(connectivity)
    mask = _check_2d(jnp.asarray(mask, bool), "connected_components")
    flat = mask.reshape((-1,) + mask.shape[-2:])
    labels = jax.vmap(lambda m: _labels_one(m, connectivity))(flat)
    return labels.reshape(mask.shape)


def _largest_one(fg, connectivity: int):
    h, w = fg.shape
    n = h * w
    lab = _labels_one(fg, connectivity)
    sizes = jnp.zeros((n + 1,), jnp.int32).at[lab.reshape(-1)].add(1)[:n]
    best = jnp.argmax(sizes)  # the first (smallest label) among the largest
    return (lab == best) & fg


@functools.partial(jax.jit, static_argnames=("connectivity",))
def largest_component(mask, connectivity: int = 8):
    """The largest connected component of each boolean mask ``(..., H, W)`` (same shape, bool).

    Ties between equally large components go to the one whose first pixel comes first in
    row-major order. An empty mask gives an empty mask. Connectivity as in
    :func:`connected_components`.
    """
    connectivity = _check_connectivity(connectivity)
    mask = _check_2d(jnp.asarray(mask, bool), "largest_component")
    flat = mask.reshape((-1,) + mask.shape[-2:])
    out = jax.vmap(lambda m: _largest_one(m, connectivity))(flat)
    return out.reshape(mask.shape)


def _mask_box(m):
    """The tight inclusive box of a boolean ``(H, W)`` mask; the empty box when it is empty."""
    h, w = m.shape
    rows = jnp.any(m, axis=1)
    cols = jnp.any(m, axis=0)
    y0 = jnp.argmax(rows)
    y1 = h - 1 - jnp.argmax(rows[::-1])
    x0 = jnp.argmax(cols)
    x1 = w - 1 - jnp.argmax(cols[::-1])
    box = jnp.stack([y0, x0, y1, x1]).astype(jnp.int32)
    return jnp.where(jnp.any(rows), box, jnp.asarray(EMPTY_BOX, jnp.int32))


@functools.partial(jax.jit, static_argnames=("connectivity",))
def _localization_box_jit(maps, threshold, connectivity):
    flat = maps.reshape((-1,) + maps.shape[-2:]).astype(jnp.float32)

    def one(m):
        top = jnp.max(m)
        fg = (m >= threshold * top) & (top > 0)
        return _mask_box(_largest_one(fg, connectivity))

    return jax.vmap(one)(flat).reshape(maps.shape[:-2] + (4,))


def localization_box(maps, threshold: float = 0.15, *, connectivity: int = 8):
    """Weakly-supervised localisation boxes: Grad-CAM §4.1.

    For each map: keep the pixels whose value is at least ``threshold`` times the map's maximum
    (``map >= threshold * max(map)``), take the single largest connected segment of them
    (``connectivity`` 8: edge and corner neighbours; 4: edge neighbours only — see
    :func:`connected_components`; ties go to the segment whose first pixel comes first in
    row-major order), and return its bounding box. A map whose maximum is not positive (an
    all-zero Grad-CAM), or that holds a NaN, has no segment and gets the empty box
    ``(0, 0, -1, -1)``, whose IoU with anything is 0 (:func:`evaluate` reports a NaN map's IoU
    and localisation error as NaN).

    Args:
      maps: ``(B, H, W)``, or ``(B, K, H, W)`` for K classes per image. 2-D only: a signal's
        ``(B, T)`` maps are refused; a volume's ``(B, D, H, W)`` maps would be read as D maps
        per image (one box per slice), so do not pass them.
      threshold: the fraction of the maximum (the paper's 15%). May be traced.
      connectivity: 8 (default) or 4.

    Returns:
      ``(..., 4)`` int32 boxes ``(y0, x0, y1, x1)``, inclusive pixel indices.

    Works under ``jit`` (the segmentation is a ``lax.while_loop``) and ``vmap``.

    References:
      Selvaraju et al., "Grad-CAM", ICCV 2017, §4.1, https://arxiv.org/abs/1610.02391 (after
      Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016, §3).
    """
    maps = check_map_batch(maps, "localization_box")
    if maps.ndim not in (3, 4):
        raise ValueError(
            f"localization_box: boxes are 2-D: maps must be (B, H, W) or (B, K, H, W); got shape "
            f"{maps.shape}. Signal (B, T) and volume maps have no box here (use pointing_game with a "
            f"mask, or the removal metrics); for a single (H, W) map pass maps[None]."
        )
    return _localization_box_jit(maps, jnp.asarray(threshold, jnp.float32), _check_connectivity(connectivity))


@jax.jit
def box_iou(a, b):
    """Intersection over union of inclusive pixel boxes ``(..., 4)`` (broadcasting).

    Areas count pixels: ``(y1 - y0 + 1) * (x1 - x0 + 1)``, so two identical one-pixel boxes have
    IoU 1. An empty box (``y1 < y0`` or ``x1 < x0``) has area 0 and IoU 0 with everything.
    Boxes are 2-D: anything but 4 numbers per box (a 1-D interval, a 3-D box) is refused.
    """
    a = jnp.asarray(a, jnp.int32)
    b = jnp.asarray(b, jnp.int32)
    if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(
            f"box_iou: boxes are 2-D, (..., 4) inclusive (y0, x0, y1, x1); got shapes {a.shape} and "
            f"{b.shape}. Intervals of signals and 3-D boxes are not supported."
        )

    def area(x):
        return jnp.maximum(x[..., 2] - x[..., 0] + 1, 0) * jnp.maximum(x[..., 3] - x[..., 1] + 1, 0)

    ih = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]) + 1, 0)
    iw = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]) + 1, 0)
    inter = (ih * iw).astype(jnp.float32)
    union = (area(a) + area(b)).astype(jnp.float32) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("shape",))
def _boxes_to_masks(boxes, shape):
    h, w = shape
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    b = boxes[..., None, None, :]
    return (ys >= b[..., 0]) & (ys <= b[..., 2]) & (xs >= b[..., 1]) & (xs <= b[..., 3])


def boxes_to_masks(boxes, shape, valid=None):
    """Boolean masks ``(..., H, W)`` of inclusive boxes ``(..., 4)``.

    With ``boxes (B, M, 4)`` and ``valid (B, M)`` (which of the M boxes exist), returns the union
    per image ``(B, H, W)`` — several objects of the class in one image.
    """
    boxes = jnp.asarray(boxes, jnp.int32)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes_to_masks: boxes are 2-D: boxes (..., 4) and shape (H, W); got boxes {boxes.shape} "
            f"and shape {shape}."
        )
    masks = _boxes_to_masks(boxes, shape)
    if valid is not None:
        masks = jnp.any(masks & jnp.asarray(valid, bool)[..., None, None], axis=-3)
    return masks


@functools.partial(jax.jit, static_argnames=("iou_threshold",))
def _correct_jit(pred_boxes, pred_classes, gt_boxes, gt_labels, gt_valid, iou_threshold):
    iou = box_iou(pred_boxes[:, :, None, :], gt_boxes[:, None, :, :])  # (B, K, M)
    match = (pred_classes[:, :, None] == gt_labels[:, None, :]) & gt_valid[:, None, :]
    return jnp.any(match & (iou >= iou_threshold), axis=-1)


def _ground_truth(gt_boxes, gt_labels, gt_valid):
    """Boxes ``(B, M, 4)``, labels ``(B, M)`` and validity ``(B, M)`` from the accepted forms."""
    gt_boxes = jnp.asarray(gt_boxes, jnp.int32)
    if gt_boxes.ndim == 2:
        gt_boxes = gt_boxes[:, None]
    gt_labels = jnp.asarray(gt_labels, jnp.int32)
    if gt_labels.ndim == 1:
        gt_labels = jnp.broadcast_to(gt_labels[:, None], gt_boxes.shape[:2])
    gt_valid = jnp.ones(gt_boxes.shape[:2], bool) if gt_valid is None else jnp.asarray(gt_valid, bool)
    return gt_boxes, gt_labels, gt_valid


def localization_correct(
    pred_boxes, pred_classes, gt_boxes, gt_labels, gt_valid=None, *, iou_threshold: float = 0.5
):
    """Which (class, box) guesses localise an object: ILSVRC's criterion.

    Guess ``k`` of image ``b`` is correct when its class equals the class of one of the image's
    ground-truth objects **and** its box overlaps that object's box with IoU >= 0.5.

    Args:
      pred_boxes: ``(B, K, 4)`` one box per guessed class (e.g. :func:`localization_box` of the
        maps of each image's top-K classes), or ``(B, 4)`` for one guess.
      pred_classes: ``(B, K)`` (or ``(B,)``) the guessed classes, most probable first.
      gt_boxes: ``(B, M, 4)`` ground-truth boxes (or ``(B, 4)``: one per image).
      gt_labels: ``(B, M)`` their classes, or ``(B,)`` one class per image.
      gt_valid: ``(B, M)`` bool, which ground-truth boxes exist (images with fewer than M
        objects); default all.
      iou_threshold: 0.5 in ILSVRC.

    Returns:
      ``(B, K)`` bool.
    """
    pred_boxes = jnp.asarray(pred_boxes, jnp.int32)
    pred_classes = jnp.asarray(pred_classes, jnp.int32)
    if pred_boxes.ndim == 2:
        pred_boxes = pred_boxes[:, None]
    if pred_classes.ndim == 1:
        pred_classes = pred_classes[:, None]
    gt_boxes, gt_labels, gt_valid = _ground_truth(gt_boxes, gt_labels, gt_valid)
    if pred_boxes.shape[:2] != pred_classes.shape:
        raise ValueError(
            f"localization_correct: pred_boxes {pred_boxes.shape} and pred_classes "
            f"{pred_classes.shape} disagree on (B, K)."
        )
    if gt_labels.shape != gt_boxes.shape[:2] or gt_valid.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"localization_correct: gt_boxes {gt_boxes.shape}, gt_labels {gt_labels.shape} "
            f"and gt_valid {gt_valid.shape} disagree on (B, M)."
        )
    return _correct_jit(pred_boxes, pred_classes, gt_boxes, gt_labels, gt_valid, float(iou_threshold))


class Localization(NamedTuple):
    """Per-image results of :func:`localization_errors` (arrays over the batch).

    ``boxes (B, K, 4)``, ``iou (B, K)`` the best IoU of each guessed box with a ground-truth box
    of the same class (0 when the class is wrong), ``correct (B, K)`` bool.
    ``top1_error`` / ``top5_error`` are fractions in [0, 1] (multiply by 100 for the paper's %).
    """

    boxes: jax.Array
    iou: jax.Array
    correct: jax.Array

    @property
    def top1_error(self):
        return 1.0 - jnp.mean(self.correct[:, 0].astype(jnp.float32))

    def top_k_error(self, k: int):
        return 1.0 - jnp.mean(jnp.any(self.correct[:, :k], axis=1).astype(jnp.float32))

    @property
    def top5_error(self):
        return self.top_k_error(5)


def localization_errors(
    maps,
    pred_classes,
    gt_boxes,
    gt_labels,
    gt_valid=None,
    *,
    threshold: float = 0.15,
    iou_threshold: float = 0.5,
    connectivity: int = 8,
) -> Localization:
    """Top-1 / top-K localisation error of maps, as in Grad-CAM §4.1 (ILSVRC's protocol).

    For each image the model's top-K classes are the guesses (``pred_classes``, most probable
    first) and ``maps[:, k]`` is the explanation of class ``pred_classes[:, k]`` (one call of
    ``gcj.grad_cam(tap, x, target=pred_classes)`` gives all of them from one forward pass). Each
    map becomes a box by :func:`localization_box`; a guess is correct when its class is a
    ground-truth class of the image and its box has IoU >= ``iou_threshold`` with a box of that
    class (:func:`localization_correct`). Top-1 error: the fraction of images whose first guess
    is wrong; top-5: whose five guesses are all wrong.

    Args:
      maps: ``(B, K, H, W)`` (or ``(B, H, W)`` for K = 1).
      pred_classes: ``(B, K)`` (or ``(B,)``).
      gt_boxes, gt_labels, gt_valid: as in :func:`localization_correct`.

    Returns:
      a :class:`Localization` (``.top1_error``, ``.top5_error``, per-image ``.iou``...).

    References:
      Selvaraju et al., ICCV 2017, §4.1 and Table 1 (VGG-16, ILSVRC-15 val: 56.51% / 46.41%);
      Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015, §4.1.
    """
    maps = jnp.asarray(maps)
    if maps.ndim == 3:
        maps = maps[:, None]
    pred_classes = jnp.asarray(pred_classes, jnp.int32)
    if pred_classes.ndim == 1:
        pred_classes = pred_classes[:, None]
    boxes = localization_box(maps, threshold, connectivity=connectivity)
    correct = localization_correct(
        boxes, pred_classes, gt_boxes, gt_labels, gt_valid, iou_threshold=iou_threshold
    )
    gt_boxes, gt_labels, valid = _ground_truth(gt_boxes, gt_labels, gt_valid)
    iou = box_iou(boxes[:, :, None, :], gt_boxes[:, None, :, :])
    same = (pred_classes[:, :, None] == gt_labels[:, None, :]) & valid[:, None, :]
    return Localization(boxes, jnp.max(jnp.where(same, iou, 0.0), axis=-1), correct)
